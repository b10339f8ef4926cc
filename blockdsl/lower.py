"""Plan -> nn.Module: the builder. Sharing is module reuse; each layer lowers through its registry entry.

Each parameter group of the Plan becomes exactly one module; every layer instance that
names the group gets that same object, built by its registry entry (no per-name code
here: a registered primitive lowers like a shipped one). Implementation choices
(attention kernel, MoE dispatch) are made per device and precision: from the on-disk
tuning cache (`tuning_cache.py`, below this module; the tuner sits above it) when
`blockdsl compile --tune` measured this shape here, else from each entry's default rule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from blockdsl.device import default_device
from blockdsl.nn.model import BlockModel, Residual
from blockdsl.nn.norm import make_norm
from blockdsl.nn.stems import ClassifierHead, LMHead, PatchEmbedding, TokenEmbedding
from blockdsl.plan import LayerPlan, NormPlan, Plan
from blockdsl.primitives import BuildEnv, attention_impl, get
from blockdsl.tuning_cache import lookup

__all__ = ["attention_impl", "build_from_plan", "build_layer", "random_batch"]


def _norm(n: NormPlan, d: int) -> nn.Module:
    return make_norm(n.kind, d, eps=n.args.get("eps"), bias=n.args.get("bias", True))


def build_layer(layer: LayerPlan, env: BuildEnv, tokens: int | None = None) -> nn.Module:
    """The module of one layer, built by its registry entry.

    An explicit impl=/dispatch= in the spec wins; `auto` takes the tuned choice for this
    shape on this machine when `compile --tune` measured it (at the run nearest `tokens`),
    else the entry's lowering applies its default rule.
    """
    prim = get(layer.prim)  # resolve() rejects unknown names
    a: dict[str, Any] = dict(layer.args)
    tn = prim.tunable
    if tn is not None and a.get(tn.arg) == "auto":
        a[tn.arg] = lookup(layer, env.d, env.seq, env.precision, env.device, tokens) or "auto"
    if layer.placement == "peri" and layer.norms and not prim.x_norm:
        raise ValueError(f"{layer.label}: peri-norm needs a primitive that reads x_norm=, "
                         f"and {layer.prim!r} does not")
    return prim.build(a, env)


def build_from_plan(plan: Plan, device: str | torch.device | None = None,
                    precision: str = "fp32", batch: int | None = None) -> BlockModel:
    """Lower a resolved Plan to a `BlockModel` on `device` (default: CUDA if present).

    `batch` (sequences or images per step) selects, among tuning runs of the same shape,
    the one timed at the nearest token count.
    """
    dev = torch.device(device) if device is not None else default_device()
    d, w = plan.d, plan.io_width
    stem_kind, sa = plan.stem
    if stem_kind == "tokens":
        stem: nn.Module = TokenEmbedding(
            sa["vocab"], w, max_len=sa["context"] if sa["pos"] == "learned" else None,
            dropout=sa["dropout"], init=sa["init"],
        )
    else:
        stem = PatchEmbedding(sa["image"], sa["patch"], sa["channels"], w, cls=sa["cls"],
                              pos=sa["pos"])
    head_kind, ha = plan.head
    if head_kind == "lm":
        head: nn.Module = LMHead(w, plan.vocab, bias=ha["bias"],
                                 tied=stem.tok if ha["tie"] else None)
    else:
        head = ClassifierHead(w, ha["classes"], pool=ha["pool"],
                              pre_logits=ha["pre_logits"] or None,
                              has_cls_token=sa.get("cls", "none") != "none")

    prims: dict[str, nn.Module] = {}
    norms: dict[str, nn.Module] = {}
    units: list[list[nn.Module]] = [[] for _ in range(plan.n_units)]
    # MoEUT scales its init by sqrt(2 / applications of *all* layers in the stack).
    env = BuildEnv(d=d, n_applications=plan.n_units, device=dev, precision=precision,
                   seq=plan.seq)
    for layer in plan.layers:
        if layer.key not in prims:
            prims[layer.key] = build_layer(layer, env, batch * plan.seq if batch else None)
        layer_norms = []
        for n in layer.norms:
            if n.key not in norms:
                norms[n.key] = _norm(n, d)
            layer_norms.append(norms[n.key])
        units[layer.unit].append(Residual(prims[layer.key], layer.placement, layer_norms))
    final = _norm(plan.final_norm, w) if plan.final_norm else None
    # `io` is what the training loop and reports read off the module.
    model = BlockModel(stem, [nn.Sequential(*u) for u in units], final, head, plan.task,
                       altup=plan.altup, io=plan.io)
    # The Plan it was built from, so a checkpoint can record the spec that rebuilds it
    # (`resolved.block`, safetensors metadata) and an exporter can read its primitives.
    model.plan = plan
    return model.to(dev)


def random_batch(plan: Plan, batch: int, device: torch.device, seq: int | None = None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and targets of the plan's task: tokens (length `seq`, default the
    model's) for a language model, images and labels for a classifier. With a (CPU)
    `generator` they are drawn from it and moved to `device`; else from the device's RNG."""
    kw: dict[str, Any] = {"device": device} if generator is None else {"generator": generator}
    if plan.task == "lm":
        shape = (batch, seq or plan.seq)
        x = torch.randint(0, plan.vocab, shape, **kw)
        y = torch.randint(0, plan.vocab, shape, **kw)
    else:
        sa = plan.stem[1]
        x = torch.randn(batch, sa["channels"], sa["image"], sa["image"], **kw)
        y = torch.randint(0, plan.head[1]["classes"], (batch,), **kw)
    return x.to(device), y.to(device)
