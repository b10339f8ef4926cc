"""Standalone PyTorch source for each primitive, one module per family.

Each registry entry names its generator (`Primitive.codegen`, "package.module:function",
imported only when exporting, so the registry stays torch-free). A generator takes the
live module blockdsl built for one parameter group and returns a `Code`: the class that
computes the same forward in plain torch, the constructor arguments that give it the
same parameter shapes, and the helper functions it calls. `blockdsl/export/pytorch.py`
writes each distinct source once, then the model top to bottom.

Why generated per primitive rather than one template: a primitive added to the registry
with a `codegen` exports like a shipped one, and one a generator does not cover is named
in the error instead of silently mis-exported.

The generated classes are inference-only: no dropout, no auxiliary losses, no router
noise or expert dropout (all of which act only in training), and one expert-dispatch
path (a loop over experts, blockdsl's numerical reference). Their parameter and buffer
names are the blockdsl modules' own, so a blockdsl checkpoint loads into them as is.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Code(NamedTuple):
    """One module's standalone form: class name, constructor kwargs, and the source blocks
    (helpers first, then the class) it needs; blocks shared by several primitives are
    written once."""

    cls: str
    kwargs: dict[str, Any]
    sources: tuple[str, ...]
