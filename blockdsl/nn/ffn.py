"""Position-wise feed-forward layers, plain and gated (GLU variants, Shazeer 2020).

The activation helpers are public so MoE experts compute exactly what a dense FFN does.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from blockdsl import names
from blockdsl.names import ACTIVATIONS, GATE_OF

_ELEMENTWISE: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU, as in BERT, ViT
    "gelu_tanh": partial(F.gelu, approximate="tanh"),  # GPT-2's approximation
    "silu": F.silu,
}
# gated name -> activation applied to the gate half (the names live in blockdsl.names)
_GATED: dict[str, str] = GATE_OF


def _check(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")


def is_gated(name: str) -> bool:
    """`names.is_gated` (the rule), after rejecting a name no module implements."""
    _check(name)
    return names.is_gated(name)


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The elementwise function of `name`; for a gated name, the one applied to the gate."""
    _check(name)
    return _ELEMENTWISE[_GATED.get(name, name)]


def activate(h: Tensor, name: str) -> Tensor:
    """Hidden activation of an FFN: act(h), or act(gate) * up with h = [gate | up] on dim -1.

    The gate is the *first* half, matching the fused `w_in` layout of `FeedForward`.
    """
    fn = activation_fn(name)
    if name in _GATED:
        gate, up = h.chunk(2, dim=-1)
        return fn(gate) * up
    return fn(h)


class FeedForward(nn.Module):
    """w_out(act(w_in x)): params d*d_ff*(2 or 3) + biases (d_ff or 2 d_ff) + d.

    Gated kinds fuse gate and up projections into one `w_in` of width 2 d_ff (one matmul).
    `dropout` is applied to the hidden activation and to the output, as in timm's Mlp.
    """

    def __init__(
        self,
        d: int,
        d_ff: int,
        activation: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        width = 2 * d_ff if is_gated(activation) else d_ff
        self.activation = activation
        self.dropout = dropout
        self.w_in = nn.Linear(d, width, bias=bias)
        self.w_out = nn.Linear(d_ff, d, bias=bias)

    def forward(self, x: Tensor, x_norm: Tensor | None = None) -> Tensor:
        """`x_norm` is accepted (and ignored) so every sub-layer has one call signature."""
        h = F.dropout(activate(self.w_in(x), self.activation), self.dropout, self.training)
        return F.dropout(self.w_out(h), self.dropout, self.training)
