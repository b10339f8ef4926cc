"""The Plan as a graph, and the parameter/FLOP accounting computed from it alone.

Conventions (also in the README):
- stored parameters: every parameter tensor counted once, however many layers use it;
- active parameters per token: stored, except that a routed layer counts only the
  experts one token uses (k for top-k and sigma-MoE, the capacity factor on average for
  expert choice) plus its router; embeddings count in full;
- FLOPs per token: forward, multiply-add = 2, every application of a shared layer
  counted (see `primitives/attention.py` for the attention term).
No torch: `blockdsl check` and summaries stay instant.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from blockdsl.names import GATED
from blockdsl.plan import Plan
from blockdsl.primitives import (
    FAMILIES,
    PRIMITIVES,
    Ctx,
    altup_flops,
    altup_params,
    head_flops,
    head_params,
    norm_params,
    stem_flops,
    stem_params,
)

if TYPE_CHECKING:
    import networkx as nx


def human(n: float) -> str:
    """1234567 -> '1.23M': the short form reports and pictures print."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


@dataclass
class Row:
    index: int
    unit: int
    block: str
    repeat: int
    label: str
    prim: str
    group: str
    applications: int
    owner: bool  # first use of its parameter group: the row that "owns" the parameters
    params: int  # parameters of the group (primitive + its norms owned here)
    active: float
    flops: float


@dataclass
class Report:
    name: str
    file: str
    task: str
    d: int
    seq: int
    layers: int
    units: int
    stored_params: int
    active_params_per_token: int
    flops_per_token: float
    breakdown: dict[str, int]
    rows: list[Row] = field(default_factory=list)
    sharing: dict[str, int] = field(default_factory=dict)  # group -> applications (>1 only)
    assignment: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["flops_per_token"] = float(self.flops_per_token)
        out["conventions"] = {
            "stored_params": "each parameter counted once, shared groups once",
            "active_params_per_token": "stored minus experts a token does not use",
            "flops_per_token": f"forward, multiply-add=2, attention at sequence length {self.seq}",
        }
        return out


def ctx_for(plan: Plan) -> Ctx:
    return Ctx(d=plan.d, seq=plan.seq, causal=plan.task == "lm", rope=False)


def io_width(plan: Plan) -> int:
    """Width of the embedding, final norm and head: K·d under wide AltUp, else d."""
    if plan.altup and plan.altup["mode"] == "wide":
        return plan.d * plan.altup["k"]
    return plan.d


def report(plan: Plan) -> Report:
    ctx = ctx_for(plan)
    w = io_width(plan)
    stem_kind, stem_args = plan.stem
    head_kind, head_args = plan.head
    breakdown = {
        "stem": stem_params(stem_kind, stem_args, w),
        "head": head_params(head_kind, head_args, w, plan.vocab),
        "final_norm": norm_params(plan.final_norm.kind, plan.final_norm.args, w)
        if plan.final_norm
        else 0,
        "altup": altup_params(plan.altup["k"], plan.n_units) if plan.altup else 0,
        **dict.fromkeys(FAMILIES, 0),  # the registry's families, in their order
        "norms": 0,
    }
    apps: dict[str, int] = {}
    for layer in plan.layers:
        apps[layer.key] = apps.get(layer.key, 0) + 1
        for n in layer.norms:
            apps[n.key] = apps.get(n.key, 0) + 1
    seen: set[str] = set()
    rows: list[Row] = []
    active = 0.0
    flops = stem_flops(stem_kind, stem_args, w) + head_flops(
        head_kind, head_args, w, plan.vocab, plan.seq
    )
    if plan.altup:
        flops += altup_flops(plan.altup["k"], plan.d) * plan.n_units
    for layer in plan.layers:
        prim = PRIMITIVES[layer.prim]
        owner = layer.key not in seen
        p = prim.params(ctx, layer.args) if owner else 0
        a = prim.active(ctx, layer.args) if owner else 0.0
        seen.add(layer.key)
        breakdown[layer.family] = breakdown.get(layer.family, 0) + p
        n_p = 0
        for n in layer.norms:
            if n.key not in seen:
                seen.add(n.key)
                n_p += norm_params(n.kind, n.args, plan.d)
        breakdown["norms"] += n_p
        f = prim.flops(ctx, layer.args)
        flops += f
        active += a + n_p
        rows.append(
            Row(
                index=layer.index, unit=layer.unit, block=layer.block, repeat=layer.repeat,
                label=layer.label, prim=layer.prim, group=layer.key,
                applications=apps[layer.key], owner=owner, params=p + n_p,
                active=a + n_p, flops=f,
            )
        )
    stored = sum(breakdown.values())
    active += breakdown["stem"] + breakdown["head"] + breakdown["final_norm"] + breakdown["altup"]
    return Report(
        name=plan.name,
        file=plan.file,
        task=plan.task,
        d=plan.d,
        seq=plan.seq,
        layers=len(plan.layers),
        units=plan.n_units,
        stored_params=stored,
        active_params_per_token=int(round(active)),
        flops_per_token=flops,
        breakdown=breakdown,
        rows=rows,
        sharing={k: v for k, v in apps.items() if v > 1},
        assignment=dict(plan.assignment),
    )


def to_graph(plan: Plan) -> nx.DiGraph:
    """Nodes: stem, each layer instance, final norm, head; edges: the data flow.

    Node attributes carry the primitive and the parameter group, so instances that share
    weights are the nodes with equal `group`.
    """
    import networkx as nx  # only here: `check` must not pay for its import

    g = nx.DiGraph(name=plan.name)
    g.add_node("stem", kind=plan.stem[0], group="stem")
    prev = "stem"
    for layer in plan.layers:
        node = f"L{layer.index}"
        g.add_node(
            node,
            kind=layer.prim,
            family=layer.family,
            label=f"{layer.block}[{layer.repeat}].{layer.label}",
            group=layer.key,
            norms=",".join(n.key for n in layer.norms),
            placement=layer.placement,
            unit=layer.unit,
        )
        g.add_edge(prev, node)
        prev = node
    if plan.final_norm:
        g.add_node("final_norm", kind=plan.final_norm.kind, group="final_norm")
        g.add_edge(prev, "final_norm")
        prev = "final_norm"
    g.add_node("head", kind=plan.head[0], group="head")
    g.add_edge(prev, "head")
    return g


# ---------------------------------------------------------------- memory estimate

_GIB = 1024**3


def human_bytes(n: float) -> str:
    """2.5e9 -> '2.33 GiB': binary units, as /proc/meminfo and CUDA report memory."""
    for unit, div in (("TiB", 1024**4), ("GiB", _GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass
class MemoryEstimate:
    """Bytes one process needs for a step of `plan` at `batch` x `seq`, by part.

    `weights` are the fp32 parameters (plus the bf16 copies autocast caches for the
    step); `grads` one fp32 gradient per parameter; `optimizer` AdamW's two fp32
    moments; `activations` what the forward saves for backward at this batch, plus the
    largest layer's worth again for the gradients in flight during its backward.
    """

    weights: int
    grads: int
    optimizer: int
    activations: int
    batch: int
    seq: int
    precision: str

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    def parts(self) -> str:
        named = (("weights", self.weights), ("gradients", self.grads),
                 ("AdamW state", self.optimizer), ("activations", self.activations))
        return ", ".join(f"{k} {human_bytes(v)}" for k, v in named if v)


def _attention_saves_scores(layer_args: dict[str, Any], device_type: str, precision: str,
                            seq: int) -> bool:
    """Whether an mha layer runs the explicit-softmax path, which saves the T x T scores.

    Mirrors `lower.attention_impl`'s default rule (torch-free here): an explicit
    impl=manual/bmm, the CPU bf16/fp32-medium default at seq <= 512, or dropout (bmm falls
    back to the reference path). SDPA's fused kernels save only a log-sum-exp per row.
    A tuned 'auto' may pick either; counting the scores then is the conservative side.
    """
    impl = layer_args.get("impl", "auto")
    if impl in ("manual", "bmm") or layer_args.get("dropout", 0.0) > 0:
        return True
    if impl == "auto":
        return device_type == "cpu" and precision in ("bf16", "fp32-medium") and seq <= 512
    return False


# Mirrors blockdsl.nn.dispatch.SMALL_EXPERT_WEIGHT (kept here so this module stays
# torch-free; tests/test_memory.py checks the two agree).
SMALL_EXPERT_WEIGHT = 32768


def _dispatch_saves_rows(dispatch: str, expert_weight: int, device_type: str) -> bool:
    """Whether the expert dispatch keeps per-slot tensors for backward ("bmm", "loop", and
    "auto" where `resolve_impl` picks "bmm": CPU with an expert weight of d x first-layer
    width <= SMALL_EXPERT_WEIGHT) rather than only the hidden ("sort", "grouped_mm")."""
    if dispatch == "auto":
        return device_type == "cpu" and expert_weight <= SMALL_EXPERT_WEIGHT
    return dispatch in ("bmm", "loop")


def _grid_slots(m: int, experts: int, a: dict[str, Any]) -> int:
    """Slots "bmm" lays m assignments out in: one [E, C] grid while padding stays under
    1.25x, else tiles of half the mean load (bucketed to >= 8 rows): at most ~1.5 m plus
    one bucket per expert; "loop" keeps exactly m rows."""
    return m if a.get("dispatch") == "loop" else math.ceil(1.6 * m) + 16 * experts


def _grid_tiles(m: int, experts: int, a: dict[str, Any], e: int) -> int:
    """Tiles of a tiled "bmm" grid, each keeping its own copy of its expert's weights: tiles
    of t >= max(q, m / 2E) rows (q = 16 under bf16, else 8: `_capacity_bucket`) give
    sum_e ceil(load_e / t) <= E + min(2E, m / q)."""
    q = 16 if e == 2 else 8
    return 0 if a.get("dispatch") == "loop" else experts + min(2 * experts, -(-m // q))


def estimate_memory(plan: Plan, batch: int, seq: int | None = None, precision: str = "fp32",
                    optimizer: bool = True, device_type: str = "cpu") -> MemoryEstimate:
    """A conservative upper estimate of one training step's memory, from the Plan alone.

    Activations are counted per layer application (a shared layer saves its tensors each
    time it runs) from what the modules keep for backward, with N = batch x seq tokens,
    e = 2 bytes under bf16 autocast else 4, fp32 (4 bytes) where the code computes in fp32:
    - every norm: its fp32 input, N·d·4;
    - mha: the projection input N·d·e, q/k/v N·(h+2·kv)·dh·e (twice with RoPE), the
      output-projection input N·h·dh·e, the log-sum-exp N·h·4; the explicit-softmax
      path adds the scores and probabilities, B·h·T²·(4+e) (see `_attention_saves_scores`);
    - switchhead: input, q, k, the V/O expert inputs and outputs of its k experts,
      N·h·dh·(3+2k)·e, plus fp32 selector logits and probabilities for V and O;
    - mlp: input N·d·e and hidden N·(g+1)·f·e (g = 2 for gated activations);
    - topk / sigma_moe: fp32 router logits and probabilities N·E·8 and, for each of the
      k copies of a token the dispatch gathers, its hidden ("sort", "grouped_mm") or its
      input, hidden and output in every slot of the padded grid, plus the grid's
      per-tile weight copies ("bmm", "loop"; switchhead likewise); expert choice the
      same with the capacity factor in place of k;
    - the head: its input, the logits in the autocast dtype, their fp32 copy and
      cross-entropy's log-softmax, N·V·(e+8); AltUp keeps K streams per block.
    Gradients of the activations live only while one layer runs backward: the largest
    layer's activations are added once more. The search never uses this estimate to
    rank models; it only decides whether a run can start.
    """
    e = 2 if precision == "bf16" else 4
    seq = seq or plan.seq
    n = batch * seq
    d, w = plan.d, io_width(plan)
    stored = report(plan).stored_params
    ctx = ctx_for(plan)
    weights = stored * 4 + (stored * 2 if precision == "bf16" else 0)
    grads = stored * 4
    opt = stored * 8 if optimizer else 0

    def ffn_hidden(act: str, f: int) -> int:
        # kept for backward: the pre-activation(s) and the activation's output, and for a
        # gated unit also the product that feeds the output projection
        return (4 if act in GATED else 2) * f

    per_layer: list[int] = []  # saved for backward, per application
    transient = 0  # the largest extra a single layer holds while it runs
    for layer in plan.layers:
        a, p = layer.args, layer.prim
        acts = len(layer.norms) * n * d * 4
        extra = 0
        if p == "mha":
            h, kv, dh = a["heads"], a["kv_heads"], a["head_dim"]
            qkv = (h + 2 * kv) * dh * (2 if a["rope"] else 1)
            acts += n * (d + qkv + 2 * h * dh) * e + n * h * 4
            if _attention_saves_scores(a, device_type, precision, seq):
                acts += batch * h * seq * seq * (4 + e)
        elif p == "switchhead":
            h, dh, k = a["heads"], a["head_dim"], (a["k"] if a["experts"] > 1 else 1)
            acts += n * d * e + n * h * dh * (5 + 2 * k) * e + n * h * 4
            acts += n * 2 * h * a["experts"] * 8
            if a["experts"] > 1 and _dispatch_saves_rows(a.get("dispatch", "auto"), d * dh,
                                                         device_type):
                # V and O: every padded slot's gathered input and output, and "bmm"'s
                # per-tile weight copies
                acts += 2 * _grid_slots(n * h * k, h * a["experts"], a) * (d + dh) * e
                acts += 2 * _grid_tiles(n * h * k, h * a["experts"], a, e) * d * dh * e
        elif p == "mlp":
            acts += n * (d + ffn_hidden(a["act"], a["d_ff"])) * e
        elif p in ("topk", "expert_choice", "sigma_moe"):
            if p == "sigma_moe":
                copies, hidden = a["k"], 2 * a["expert_size"]
            else:
                hidden = ffn_hidden(a["act"], a["d_ff"])
                copies = a["k"] if p == "topk" else min(a["capacity_factor"], a["experts"])
            m = int(math.ceil(n * copies))  # token-expert assignments
            acts += n * d * e + n * a["experts"] * 8
            gate_width = (2 if a["act"] in GATED else 1) * (
                a["expert_size"] if p == "sigma_moe" else a["d_ff"])
            if _dispatch_saves_rows(a.get("dispatch", "auto"), d * gate_width, device_type):
                # "bmm"/"loop" keep each slot's gathered input, hidden, activation and
                # output, and "bmm" its per-tile weight copies
                acts += _grid_slots(m, a["experts"], a) * (2 * d + hidden) * e
                acts += _grid_tiles(m, a["experts"], a, e) * d * gate_width * 2 * e
            else:
                acts += m * hidden * e
            extra = m * 2 * d * e  # gathered inputs and per-assignment outputs
            if a.get("shared_d_ff"):
                acts += n * ffn_hidden(a["act"], a["shared_d_ff"]) * e
        if e == 2:  # the bf16 copy of the layer's weights its matmuls keep, per application
            acts += PRIMITIVES[p].params(ctx, a) * 2
        per_layer.append(acts)
        transient = max(transient, acts + extra)
    total_acts = sum(per_layer) + n * w * 4  # + the stem's output
    if plan.altup:
        total_acts += plan.n_units * plan.altup["k"] * n * d * 4 * 2
    if plan.final_norm:
        total_acts += n * w * 4
    if plan.task == "lm":
        head = n * w * e + n * plan.vocab * (e + 8)
    else:
        head = batch * (w * e + plan.head[1]["classes"] * 12)
    total_acts += head + max(transient, head)
    return MemoryEstimate(weights=weights, grads=grads, optimizer=opt, activations=total_acts,
                          batch=batch, seq=seq, precision=precision)
