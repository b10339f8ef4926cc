"""Make a lowered model traceable as one graph: `torch.export` and `torch.compile(fullgraph=True)`.

Everything in a `BlockModel` traces as it is (the aux-loss collector is a plain stack,
RoPE tables are built from the input's shape, `ModelOutput` is a pytree node) except three
MoE dispatch backends, which size their work on the host: "fused" is a C++ extension
function (no fake implementation; its layout is computed from the data; the fused top-k
router goes with it), "bmm" reads the per-expert loads (`.tolist()`) to lay out its slot
grid unless the routing bounds them, and "loop" skips empty experts with a Python `if`.
All three are data-dependent work a tracer cannot follow. "sort" runs inside the custom op `blockdsl::expert_ffn` (its fake
implementation gives the output shape without the data), so a traced model keeps the
expert loop as one opaque op, forward and backward. `auto` is also replaced, because
choosing among backends probes `torch._grouped_mm` with real tensors, which a tracer
cannot run either.

Why "sort" and not "grouped_mm" for every traced layer: "sort" runs on every device and
dtype; "grouped_mm" needs a kernel whose fake (meta) form accepts only bf16 here. The
numbers are the same up to summation order (every backend is tested against "loop").

A loader of an exported program with MoE layers needs the op registered: `import
blockdsl.nn.dispatch.op` (blockdsl installed) before `torch.export.load`. Dense models
need nothing but torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

TRACEABLE_DISPATCH = "sort"
# Backends that leave the device for their layout or branch on data (see above).
_UNTRACEABLE = ("auto", "fused", "bmm", "loop")


def make_traceable(model: nn.Module) -> dict[nn.Module, str]:
    """Set every untraceable MoE dispatch in `model` to "sort"; return what each was.

    In place, because a compiled model must keep the setting for as long as it runs (the
    compiled graph guards on it). Modules shared by several layers are changed once.
    """
    changed: dict[nn.Module, str] = {}
    for mod in model.modules():
        impl = getattr(mod, "dispatch", None)
        if isinstance(impl, str) and impl in _UNTRACEABLE and mod not in changed:
            changed[mod] = impl
            mod.dispatch = TRACEABLE_DISPATCH
    return changed


@contextlib.contextmanager
def traceable(model: nn.Module) -> Iterator[nn.Module]:
    """`make_traceable` for the duration of a trace (`torch.export`), then restore."""
    changed = make_traceable(model)
    try:
        yield model
    finally:
        for mod, impl in changed.items():
            mod.dispatch = impl
