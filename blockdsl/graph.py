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

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from blockdsl.plan import Plan
from blockdsl.primitives import FAMILIES, PRIMITIVES, Ctx
from blockdsl.primitives import stems as io_formulas  # stems, heads, norms, AltUp
from blockdsl.primitives.memory import MemCtx, input_only

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


def report(plan: Plan) -> Report:
    ctx = ctx_for(plan)
    w = plan.io_width
    stem_kind, stem_args = plan.stem
    head_kind, head_args = plan.head
    breakdown = {
        "stem": io_formulas.stem_params(stem_kind, stem_args, w),
        "head": io_formulas.head_params(head_kind, head_args, w, plan.vocab),
        "final_norm": io_formulas.norm_params(plan.final_norm.kind, plan.final_norm.args, w)
        if plan.final_norm
        else 0,
        "altup": io_formulas.altup_params(plan.altup["k"], plan.n_units) if plan.altup else 0,
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
    flops = io_formulas.stem_flops(stem_kind, stem_args, w) + io_formulas.head_flops(
        head_kind, head_args, w, plan.vocab, plan.seq
    )
    if plan.altup:
        flops += io_formulas.altup_flops(plan.altup["k"], plan.d) * plan.n_units
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
                n_p += io_formulas.norm_params(n.kind, n.args, plan.d)
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


def estimate_memory(plan: Plan, batch: int, seq: int | None = None, precision: str = "fp32",
                    optimizer: bool = True, device_type: str = "cpu") -> MemoryEstimate:
    """A conservative upper estimate of one training step's memory, from the Plan alone.

    Activations are counted per layer application (a shared layer saves its tensors each
    time it runs) from what the modules keep for backward, with N = batch x seq tokens,
    e = 2 bytes under bf16 autocast else 4, fp32 (4 bytes) where the code computes in fp32:
    - every norm: its fp32 input, N·d·4;
    - each layer: its registry entry's `memory` formula (primitives/memory.py; the
      formulas sit with each primitive's other formulas), plus under bf16 the copy of its
      weights its matmuls keep;
    - the head: its input, the logits in the autocast dtype, their fp32 copy and
      cross-entropy's log-softmax, N·V·(e+8); AltUp keeps K streams per block.
    Gradients of the activations live only while one layer runs backward: the largest
    layer's activations are added once more. The search never uses this estimate to
    rank models; it only decides whether a run can start.
    """
    e = 2 if precision == "bf16" else 4
    seq = seq or plan.seq
    n = batch * seq
    d, w = plan.d, plan.io_width
    stored = report(plan).stored_params
    ctx = ctx_for(plan)
    weights = stored * 4 + (stored * 2 if precision == "bf16" else 0)
    grads = stored * 4
    opt = stored * 8 if optimizer else 0

    mem = MemCtx(d=d, batch=batch, seq=seq, e=e, device_type=device_type, precision=precision)
    per_layer: list[int] = []  # saved for backward, per application
    transient = 0  # the largest extra a single layer holds while it runs
    for layer in plan.layers:
        prim = PRIMITIVES[layer.prim]
        saved, extra = (prim.memory or input_only)(mem, layer.args)
        acts = len(layer.norms) * n * d * 4 + saved
        if e == 2:  # the bf16 copy of the layer's weights its matmuls keep, per application
            acts += prim.params(ctx, layer.args) * 2
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
