"""The `dispatch=` argument every routed primitive shares (SwitchHead's V/O experts and the
MoE FFNs): its schema entry, its default rule and its tuning candidates, written once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blockdsl.names import DISPATCH, DISPATCH_BACKENDS
from blockdsl.primitives.base import ArgSpec, BuildEnv, Tunable


def dispatch_default(d_in: int | None, width: int | None, env: BuildEnv) -> str:
    """What `dispatch=auto` runs for experts of d_in x width on this device and precision
    (without the shape, the large-matmul rule).

    The rule lives with the kernels (`nn.dispatch.resolve_impl`), imported only when asked
    (the registry stays torch-free at import, for `check`); the tuner asks with torch
    loaded already.
    """
    import torch

    from blockdsl.nn.dispatch import resolve_impl

    dtype = torch.bfloat16 if env.precision == "bf16" else torch.float32
    return resolve_impl("auto", env.device, dtype, d_in, width)


DISPATCH_ARG = ArgSpec("enum", "auto", DISPATCH, "MoE dispatch implementation")


def dispatch_tunable(dims: Callable[[dict[str, Any], int], tuple[int, int]]) -> Tunable:
    """A routed primitive's `dispatch=`: every backend raced against the plain loop.

    `dims(args, d)` gives the (d_in, first-layer width) of its expert matmuls, which the
    default rule reads (when the width d is known: a BuildEnv with d=0 asks without it)."""
    return Tunable("dispatch", DISPATCH_BACKENDS, "loop",
                   lambda a, env: dispatch_default(*(dims(a, env.d) if env.d else (None, None)),
                                                   env))
