"""Plan -> nn.Module: the builder. Sharing is module reuse; implementation choices live here.

Each parameter group of the Plan becomes exactly one module; every layer instance that
names the group gets that same object. Implementation choices (attention kernel, MoE
dispatch) are made per device and precision: from the on-disk tuning cache when
`blockdsl compile --tune` measured this shape here, else from the measured defaults
recorded below.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from blockdsl.graph import io_width
from blockdsl.nn.attention import MultiHeadAttention
from blockdsl.nn.ffn import FeedForward
from blockdsl.nn.model import BlockModel, Residual
from blockdsl.nn.norm import make_norm
from blockdsl.nn.stems import ClassifierHead, LMHead, PatchEmbedding, TokenEmbedding
from blockdsl.plan import LayerPlan, NormPlan, Plan


def _norm(n: NormPlan, d: int) -> nn.Module:
    return make_norm(n.kind, d, eps=n.args.get("eps"), bias=n.args.get("bias", True))


def attention_impl(requested: str, device: torch.device, precision: str, seq: int) -> str:
    """SDPA unless measured otherwise. On CPU, when the matmuls run in bf16 (bf16 autocast, or
    fp32-medium, which routes fp32 matmuls through oneDNN's bf16 path) at short sequences,
    SDPA's fused kernel is the slow one (its backward in bf16; in fp32-medium it does not
    use the bf16 path at all): explicit batched matmuls with a hand-written backward
    measured 1.3-1.6x SDPA at seq 128-256 here. `compile --tune` overrides this per shape."""
    if requested != "auto":
        return requested
    if device.type == "cpu" and precision in ("bf16", "fp32-medium") and seq <= 512:
        return "bmm"
    return "sdpa"


def _primitive(layer: LayerPlan, d: int, apps: int, device: torch.device, precision: str,
               seq: int, tokens: int | None = None) -> nn.Module:
    a: dict[str, Any] = dict(layer.args)
    p = layer.prim
    # An explicit impl=/dispatch= in the spec wins; "auto" takes the tuned choice for this
    # shape on this machine when `compile --tune` measured it, else the default rule.
    for key in ("impl", "dispatch"):
        if a.get(key) == "auto":
            from blockdsl.tune import lookup

            a[key] = lookup(layer, d, seq, precision, device, tokens) or "auto"
    if p == "mha":
        return MultiHeadAttention(
            d, a["heads"], kv_heads=a["kv_heads"], head_dim=a["head_dim"], bias=a["bias"],
            causal=a["causal"], rope=a["rope"], rope_base=a["rope_base"],
            rope_fraction=a["rope_fraction"], impl=attention_impl(a["impl"], device, precision, seq),
            dropout=a["dropout"],
        )
    if p == "mlp":
        return FeedForward(d, a["d_ff"], activation=a["act"], bias=a["bias"], dropout=a["dropout"])
    # Routed primitives import lazily: a dense model never pays for them.
    if p == "topk":
        from blockdsl.nn.moe import TopKMoE

        return TopKMoE(
            d, a["d_ff"], a["experts"], a["k"], activation=a["act"], bias=a["bias"],
            capacity_factor=a["capacity_factor"], renormalize=a["renormalize"],
            router_noise=a["router_noise"], balance_weight=a["balance_loss"],
            z_weight=a["z_loss"], shared_d_ff=a["shared_d_ff"],
            expert_dropout=a["expert_dropout"], dispatch=a["dispatch"],
        )
    if p == "expert_choice":
        from blockdsl.nn.moe import ExpertChoiceMoE

        return ExpertChoiceMoE(
            d, a["d_ff"], a["experts"], capacity_factor=a["capacity_factor"],
            activation=a["act"], bias=a["bias"],
            group="batch" if a["group"] == "auto" else a["group"], dispatch=a["dispatch"],
        )
    if p == "sigma_moe":
        from blockdsl.nn.moe import SigmaMoE

        return SigmaMoE(
            d, a["expert_size"], a["experts"], a["k"], activation=a["act"],
            entropy_weight=a["entropy"], expert_dropout=a["expert_dropout"],
            dispatch=a["dispatch"], n_applications=apps,
        )
    if p == "switchhead":
        from blockdsl.nn.switchhead import SwitchHeadAttention

        return SwitchHeadAttention(
            d, a["heads"], a["head_dim"], a["experts"], k=a["k"], causal=a["causal"],
            rope=a["rope"], rope_fraction=a["rope_fraction"], rope_base=a["rope_base"],
            entropy_weight=a["entropy"], dispatch=a["dispatch"], n_applications=apps,
        )
    raise ValueError(f"no lowering for primitive {p!r}")  # resolve() rejects unknown names


def build_from_plan(plan: Plan, device: str | torch.device | None = None,
                    precision: str = "fp32", batch: int | None = None) -> BlockModel:
    """Lower a resolved Plan to a `BlockModel` on `device` (default: CUDA if present).

    `batch` (sequences or images per step) selects, among tuning runs of the same shape,
    the one timed at the nearest token count.
    """
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    )
    d, w = plan.d, io_width(plan)
    stem_kind, sa = plan.stem
    if stem_kind == "tokens":
        stem: nn.Module = TokenEmbedding(
            sa["vocab"], w, max_len=sa["context"] if sa["pos"] == "learned" else None,
            dropout=sa["dropout"],
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
    for layer in plan.layers:
        if layer.key not in prims:
            # MoEUT scales its init by sqrt(2 / applications of *all* layers in the stack).
            prims[layer.key] = _primitive(layer, d, plan.n_units, dev, precision, plan.seq,
                                          batch * plan.seq if batch else None)
        layer_norms = []
        for n in layer.norms:
            if n.key not in norms:
                norms[n.key] = _norm(n, d)
            layer_norms.append(norms[n.key])
        units[layer.unit].append(Residual(prims[layer.key], layer.placement, layer_norms))
    final = _norm(plan.final_norm, w) if plan.final_norm else None
    model = BlockModel(stem, [nn.Sequential(*u) for u in units], final, head, plan.task,
                       altup=plan.altup)
    # What the training loop and reports read off the module.
    model.spec_name = plan.name
    model.seq_len = plan.seq if plan.task == "lm" else None
    model.vocab_size = plan.vocab if plan.task == "lm" else None
    if plan.task == "classify":
        model.image_size, model.channels = sa["image"], sa["channels"]
        model.num_classes = ha["classes"]
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
