"""Standalone source of the dense FFN (`mlp`) and the activations experts share with it."""

from __future__ import annotations

from typing import Any

from blockdsl.export.codegen import Code
from blockdsl.names import GATE_OF

# Same functions as blockdsl.nn.ffn: exact GELU, GPT-2's tanh GELU; gated kinds apply the
# gate's function to the first half of the fused projection. The gated table is written
# from blockdsl.names, so a gated kind added there is exported with it.
ACTIVATIONS = '''
_ACT = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "silu": F.silu,
}
_GATE_OF = GATE_OF_TABLE


def activate(h, name):
    """act(h); for a gated name, act(gate) * up with h = [gate | up] on the last dim."""
    if name in _GATE_OF:
        gate, up = h.chunk(2, dim=-1)
        return _ACT[_GATE_OF[name]](gate) * up
    return _ACT[name](h)


def is_gated(name):
    return name in _GATE_OF
'''.replace("GATE_OF_TABLE", repr(dict(GATE_OF)))

FEED_FORWARD = '''
class FeedForward(nn.Module):
    """w_out(act(w_in x)); gated kinds fuse gate and up into one w_in of width 2 d_ff."""

    def __init__(self, d, d_ff, activation, bias):
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(d, 2 * d_ff if is_gated(activation) else d_ff, bias=bias)
        self.w_out = nn.Linear(d_ff, d, bias=bias)

    def forward(self, x, x_norm=None):
        return self.w_out(activate(self.w_in(x), self.activation))
'''


def mlp(m: Any) -> Code:
    return Code("FeedForward", {"d": m.w_in.in_features, "d_ff": m.w_out.in_features,
                                "activation": m.activation, "bias": m.w_in.bias is not None},
                (ACTIVATIONS, FEED_FORWARD))
