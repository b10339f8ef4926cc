"""Sharded training: FSDP2 and expert parallelism over a 2-D (dp, ep) device mesh.

`Parallel.setup` turns a built, rank-0-identical model into this rank's part of it:
- `--ep N`: every routed module's stacked expert weights are cut along the expert dim to
  this rank's E/N block and the module gets an `nn.expert_parallel.ExpertParallel`, which
  routes over the global batch and sends rows to their experts' ranks. The ranks form a
  (dp, ep) mesh, ep the inner dim: ranks r and r+1 share an EP group, so an EP group's
  batch slices are adjacent. Without FSDP, expert blocks are replicated over dp and their
  gradients summed over it.
- `--shard fsdp`: FSDP2 `fully_shard` (torch's own, as torchtitan uses it) over all ranks,
  with fp32 weights and gradient reduction under the run's autocast (see `_fully_shard`):
  first every layer shared by several applications (one FSDP unit, sharded once), then each
  block application unit, then the root. With EP on more ranks than N, each routed
  module's expert weights are first made an FSDP unit of their own over the dp sub-mesh
  (`_shard_experts`, as torchtitan's dp-shard-mod-ep mesh): a rank holds 1/dp of its EP
  block, so 1/world of every routed layer's experts, with their gradients and AdamW state.
  With EP over all ranks (dp 1) the blocks are left out of FSDP (`ignored_params`): there
  is no dp dim to shard them over.
- Gradients: FSDP's reduce-scatter averages its parameters over all ranks, the experts'
  units sum over dp and divide by the world; `reduce_grads` does the rest (replicated
  parameters: one flat all-reduce; experts outside FSDP: a sum over dp), so a step equals
  one process's step on the global batch. `clip_grad_norm` forms the global norm from
  sharded, expert and replicated gradients (torch's own cannot mix DTensor and plain
  gradients).
- Checkpoints: `torch.distributed.checkpoint` (DCP) of the model and optimizer state dicts,
  expert rows presented as DTensors of the whole [E, ...] tensor sharded along dim 0 (by EP
  block, then over dp when FSDP shards them) so DCP records global shapes and offsets; so a
  checkpoint saved at one world size (or layout) loads at another, or in one process, and
  `checkpoint.to_single_file` converts it to the folder format the rest of blockdsl reads.

Device-agnostic: the mesh takes the device type of the run (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from blockdsl.nn.expert_parallel import ExpertParallel
from blockdsl.nn.moe import ExpertChoiceMoE, SigmaMoE, TopKMoE
from blockdsl.nn.switchhead import SwitchHeadAttention
from blockdsl.names import SHARDING
from blockdsl.train.config import TrainError
from blockdsl.train.dist import Dist, on_flat_grads

# the stacked [E, ...] expert weights of each routed module type (the rest stays whole)
EXPERT_WEIGHTS: dict[type, tuple[str, ...]] = {
    TopKMoE: ("w1", "b1", "w2", "b2"), ExpertChoiceMoE: ("w1", "b1", "w2", "b2"),
    SigmaMoE: ("keys", "values"), SwitchHeadAttention: ("v", "o"),
}

# child modules whose weights a routed module's forward reads itself instead of calling them
READ_DIRECTLY: dict[type, tuple[str, ...]] = {
    TopKMoE: ("router",), ExpertChoiceMoE: ("router",),
}


def _weights_of(m: nn.Module) -> tuple[str, ...]:
    return next((w for t, w in EXPERT_WEIGHTS.items() if isinstance(m, t)), ())


def _expert_modules(model: nn.Module) -> list[nn.Module]:
    """Distinct routed modules with stacked experts (a shared one once). SwitchHead with
    one expert per head has dense V/O and no routing: nothing to split."""
    return [m for m in model.modules()  # yields a shared module once
            if _weights_of(m) and not (isinstance(m, SwitchHeadAttention) and m.experts == 1)]


def check_layout(world: int, shard: str, ep: int) -> None:
    """Reject a layout the ranks cannot form, before any collective."""
    if shard not in SHARDING:
        raise TrainError(f"shard {shard!r} is not one of {', '.join(SHARDING)}")
    if ep < 1 or world % ep:
        raise TrainError(f"--ep {ep} must divide the number of processes ({world}); start "
                         "several with --nproc N or torchrun")


@dataclass
class Parallel:
    """This rank's part of a sharded run (see the module docstring)."""

    dist: Dist
    shard: str = "none"
    ep: int = 1
    mesh: Any = None
    experts: dict[int, tuple[str, ...]] = field(default_factory=dict)  # id(param) -> fqns
    block_mesh: Any = None  # (ep, dp) view of the ranks: experts sharded over dp (see setup)

    @property
    def active(self) -> bool:
        return self.shard != "none" or self.ep > 1

    @classmethod
    def setup(cls, model: nn.Module, dist: Dist, shard: str, ep: int) -> Parallel | None:
        """Shard `model` in place; a run of one process has nothing to shard (None)."""
        check_layout(dist.world, shard, ep)
        par = cls(dist, shard, ep)
        if not par.active or dist.world == 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        par.mesh = init_device_mesh(dist.device.type, (dist.world // ep, ep),
                                    mesh_dim_names=("dp", "ep"))
        if ep > 1:
            par._split_experts(model)
        if shard == "fsdp":
            if ep > 1 and dist.world > ep:
                from torch.distributed.device_mesh import DeviceMesh

                # the same ranks with the dims swapped, so that [Shard(0), Shard(0)] on it
                # reads "E split into EP blocks, each block split over dp": the layout FSDP
                # leaves the experts in, with its global [E, ...] shape, for checkpoints.
                # Built here on every rank, as a DeviceMesh makes process groups.
                ranks = torch.arange(dist.world).view(dist.world // ep, ep).T
                par.block_mesh = DeviceMesh(dist.device.type, ranks, mesh_dim_names=("ep", "dp"))
            par._fully_shard(model)
            par._index_experts(model)  # fully_shard replaced the parameter objects
        return par

    def _split_experts(self, model: nn.Module) -> None:
        ep_rank = self.mesh.get_local_rank("ep")
        ctx = ExpertParallel(self.mesh.get_group("ep"), ep_rank, self.ep,
                             tdist.group.WORLD, self.dist.rank, self.dist.world)
        mods = _expert_modules(model)
        for m in mods:
            for attr in _weights_of(m):
                p = getattr(m, attr)
                if p is None:
                    continue
                try:
                    lo, hi = ctx.local_range(p.shape[0])
                except ValueError as e:
                    raise TrainError(f"{type(m).__name__}: {e}; choose --ep dividing it") from None
                setattr(m, attr, nn.Parameter(p.detach()[lo:hi].clone()))
            m.ep = ctx
        self._index_experts(model)

    def _index_experts(self, model: nn.Module) -> None:
        """`experts`: id of each expert parameter -> its names, looked up by module and
        attribute, so it stays right after `fully_shard` swaps parameters for DTensors."""
        ids = {id(getattr(m, a)) for m in _expert_modules(model) if getattr(m, "ep", None)
               for a in _weights_of(m) if getattr(m, a) is not None}
        fqns: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in ids:
                fqns.setdefault(id(p), []).append(name)
        self.experts = {k: tuple(v) for k, v in fqns.items()}

    def _fully_shard(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        from torch.distributed.device_mesh import init_device_mesh

        # every rank in one dim: FSDP shards the non-expert parameters over all of them
        world_mesh = init_device_mesh(self.dist.device.type, (self.dist.world,),
                                      mesh_dim_names=("fsdp",))
        # --precision is honoured as in one process: bf16 is autocast over fp32 weights.
        # FSDP's own bf16 parameter cast would halve the all-gather but also round the
        # routers' and norms' weights, which one process keeps in fp32 (routers run in
        # fp32 so that top-k choices do not flip with precision): fp32 gathers it is.
        mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        ignored = {p for p in model.parameters() if id(p) in self.experts}
        if self.block_mesh is not None:
            self._shard_experts(model, world_mesh, mp)
            ignored = set()  # the experts now belong to their modules' own FSDP units
        kw = {"mesh": world_mesh, "mp_policy": mp, "ignored_params": ignored or None}
        uses: dict[int, int] = {}
        for _, m in model.named_modules(remove_duplicate=False):
            uses[id(m)] = uses.get(id(m), 0) + 1
        units = list(getattr(model, "units", None) or [])
        # parameters some FSDP unit (or nothing, by choice) already holds
        taken = ignored | {p for m in model.modules() if isinstance(m, FSDPModule)
                           for p in m.parameters()}
        inside: set[int] = set()
        for m in model.modules():  # pre-order: the outermost shared layer comes first
            if m is model or id(m) in inside or uses[id(m)] < 2:
                continue
            if isinstance(m, FSDPModule):  # a shared routed module: sharded already
                inside.update(id(c) for c in m.modules())
            elif any(p not in taken for p in m.parameters()):  # shared: one unit, once
                fully_shard(m, **kw)
                inside.update(id(c) for c in m.modules())
        for u in units:
            fully_shard(u, **kw)
        fully_shard(model, **kw)

    def _shard_experts(self, model: nn.Module, world_mesh: Any, mp: Any) -> None:
        """FSDP + EP on more ranks than EP: each routed module's expert weights become an
        FSDP unit of their own over the dp ranks, as torchtitan shards experts over its
        dp-shard-mod-ep mesh, so a rank holds 1/dp of its EP block (weights, gradients,
        AdamW state) instead of the whole block.

        A routed module's other parameters live in child modules (SwitchHead's QK, a shared
        FFN: each its own unit over all ranks, sharded first so that the module's unit skips
        them) and in small tensors read directly in the module's forward (the router's
        weight, SigmaMoE's selector, SwitchHead's sel_v/sel_o), which the module's unit
        ignores: they stay whole on every rank and `reduce_grads` averages them with the
        other replicated parameters. The router cannot be a unit of its own: routing reads
        `router.weight` and never calls the router's forward, where FSDP gathers.

        Gradients: the reduce-scatter over dp sums the dp ranks' gradients (each already
        holds its whole EP group's tokens, summed in by the all_to_all backward) and divides
        by the world size, the sum-over-dp / world that `reduce_grads` applies to plain
        expert blocks. A plain sum then a division (`force_sum`): the custom factor would
        otherwise ask for NCCL's PREMUL_SUM, which gloo lacks.

        A rank none of whose tokens reached its block (an expert with capacity, or plain
        chance) has no gradient for it in that step, while its dp peers have one: FSDP
        would then leave the weight out of that rank's reduce-scatter and the dp group's
        collectives would no longer match (a hang, seen at step 11 of a 6-expert model). So
        each expert unit reduce-scatters zeros for an unused weight
        (`set_reduce_scatter_unused_params`), as DDP's find_unused_parameters would.
        """
        from torch.distributed.fsdp import FSDPModule, fully_shard

        # FSDP warns that a unit returning a view would lose its gather under an in-place op
        # on that view; the routed modules return `out.view(b, t, d)`, and blockdsl's
        # layers only ever add a sublayer's output out of place (`x + f(x)`)
        names = "|".join(t.__name__ for t in EXPERT_WEIGHTS)
        warnings.filterwarnings("ignore", rf"FSDP2-wrapped module \(FSDP({names})\) returned "
                                "a view tensor", UserWarning)
        dp_mesh = self.mesh["dp"]
        for m in _expert_modules(model):
            read = set(READ_DIRECTLY.get(type(m), ()))
            for name, child in m.named_children():
                if (name not in read and any(True for _ in child.parameters())
                        and not isinstance(child, FSDPModule)):
                    fully_shard(child, mesh=world_mesh, mp_policy=mp)
            own = {p for p in m.parameters(recurse=False) if id(p) not in self.experts}
            own |= {p for name in read for p in getattr(m, name).parameters()}
            fully_shard(m, mesh=dp_mesh, mp_policy=mp, ignored_params=own or None)
            m.set_gradient_divide_factor(float(self.dist.world))
            m.set_force_sum_reduction_for_comms(True)
            m.set_reduce_scatter_unused_params(True, recurse=False)

    # -- the step's hooks

    def reduce_grads(self, params: list[nn.Parameter]) -> None:
        """Average what FSDP does not: replicated parameters over all ranks; experts not
        sharded by FSDP summed over dp and divided by the world (their EP group's tokens
        already summed in). FSDP's units (experts sharded over dp among them) reduced their
        own in the backward."""
        from torch.distributed.tensor import DTensor

        plain = [p for p in params if not isinstance(p, DTensor)]
        self.dist.average_grads([p for p in plain if id(p) not in self.experts])
        exp = [p for p in plain if id(p) in self.experts]
        if not exp:
            return

        def over_dp(flat: Tensor) -> None:
            if self.mesh.size(0) > 1:
                tdist.all_reduce(flat, group=self.mesh.get_group("dp"))
            flat.div_(self.dist.world)

        on_flat_grads(exp, over_dp)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> Tensor:
        """torch's clip rule (coef = max_norm / (norm + 1e-6), at most 1) on the global norm."""
        from torch.distributed.tensor import DTensor

        dev = self.dist.device
        # replicated; sharded (FSDP: a distinct piece on every rank, experts included when
        # FSDP shards them over dp); plain expert blocks (distinct within an EP group only)
        sums = torch.zeros(3, dtype=torch.float32, device=dev)
        grads = []
        for p in params:
            g = p.grad
            if g is None:
                continue
            local = g.to_local() if isinstance(g, DTensor) else g
            grads.append(local)
            slot = 1 if isinstance(g, DTensor) else 2 if id(p) in self.experts else 0
            sums[slot] += local.float().square().sum()
        shard = sums[1:2].clone()
        tdist.all_reduce(shard)
        expert = sums[2:3].clone()
        if self.ep > 1:
            tdist.all_reduce(expert, group=self.mesh.get_group("ep"))
        total = (sums[0] + shard[0] + expert[0]).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total

    # -- checkpoints

    def _wrap_experts(self, msd: dict[str, Any], osd: dict[str, Any]) -> dict[tuple, Any]:
        """Present this rank's expert rows as DTensors of the whole [E, ...] tensor, so DCP
        records global shapes and offsets and any layout (or one process) can read them:
        a plain EP block is Shard(0) over ep and Replicate over dp of the (dp, ep) mesh; an
        FSDP-sharded one (rows of the block, torch.chunk over dp) is [Shard(0), Shard(0)] on
        the (ep, dp) `block_mesh`, which splits dim 0 by EP block first, then over dp by the
        same chunk rule as FSDP. Returns the replaced values by (section, key), for
        `load_sharded` to put back (the wrappers view the same storage, so what DCP reads
        lands in them)."""
        if not self.experts:
            return {}
        from torch.distributed.tensor import DTensor, Replicate, Shard

        names = {n for v in self.experts.values() for n in v}
        orig: dict[tuple, Any] = {}

        def wrap(t: Tensor) -> Tensor:
            if not isinstance(t, DTensor):
                return DTensor.from_local(t, self.mesh, [Replicate(), Shard(0)], run_check=False)
            shape = torch.Size((t.shape[0] * self.ep, *t.shape[1:]))  # t: one EP block
            return DTensor.from_local(t.to_local(), self.block_mesh, [Shard(0), Shard(0)],
                                      run_check=False, shape=shape,
                                      stride=torch.empty(shape, device="meta").stride())

        for k in list(msd):
            if k in names:
                orig["model", k], msd[k] = msd[k], wrap(msd[k])
        for k, v in osd.items():  # flattened: "state.<fqn>.<exp_avg|exp_avg_sq|step>"
            if isinstance(v, Tensor) and v.ndim > 0 and _state_fqn(k) in names:
                orig["optim", k], osd[k] = v, wrap(v)
        return orig

    def optimizer_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each AdamW group split into its DTensor (FSDP) and plain (expert, replicated)
        parameters: fused and foreach kernels take one kind per group, and AdamW steps
        group by group. DTensors on different meshes (experts sharded over dp, the rest over
        all ranks) share a group: the fused step takes them together (checked in torch 2.13).
        Checkpoints store optimizer state per parameter, so the grouping may differ between
        the run that saved and the one that loads."""
        from torch.distributed.tensor import DTensor

        out = []
        for g in groups:
            for keep in (True, False):
                ps = [p for p in g["params"] if isinstance(p, DTensor) == keep]
                if ps:
                    out.append({**g, "params": ps})
        return out


def _state_fqn(key: str) -> str | None:
    """The parameter name in a flattened optimizer key "state.<fqn>.<name>"."""
    if not key.startswith("state."):
        return None
    return key[len("state."):].rsplit(".", 1)[0]


def _flat() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _state_dicts(model: nn.Module, opt: torch.optim.Optimizer | None,
                 par: Parallel | None) -> tuple[dict[str, Any], dict[tuple, Any]]:
    """The state dicts DCP saves or fills, and the expert entries `_wrap_experts` replaced."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if opt is None:
        msd, osd = get_model_state_dict(model), {}
    else:  # flattened: per-parameter keys, independent of how parameters are grouped
        msd, osd = get_state_dict(model, opt, options=_flat())
    orig = par._wrap_experts(msd, osd) if par is not None else {}
    return ({"model": msd, "optim": osd} if opt is not None else {"model": msd}), orig


def save_sharded(folder: Path, model: nn.Module, opt: torch.optim.Optimizer,
                 par: Parallel) -> None:
    """Every rank writes its shards of the model and optimizer state into `folder` (DCP)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state_dicts(model, opt, par)[0], checkpoint_id=str(folder))


def load_sharded(folder: Path, model: nn.Module, opt: torch.optim.Optimizer | None,
                 par: Parallel | None) -> None:
    """Load a DCP checkpoint into this rank's part of `model` (and `opt`), at any layout.

    `par` None (one process, or plain data parallel): every rank reads whole tensors.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    sd, orig = _state_dicts(model, opt, par)
    no_dist = par is None or not par.active
    with warnings.catch_warnings():  # DCP warns that one process reads alone: that is meant
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(sd, checkpoint_id=str(folder), no_dist=no_dist)
    msd = {k: orig.get(("model", k), v) for k, v in sd["model"].items()}
    if opt is None:
        model.load_state_dict(msd) if par is None else set_state_dict(
            model, [], model_state_dict=msd, optim_state_dict={})
        return
    osd = {k: orig.get(("optim", k), v) for k, v in sd["optim"].items()}
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd, options=_flat())



def load_whole(weights: Path, optim_state: dict[str, Any], model: nn.Module,
               opt: torch.optim.Optimizer | None, par: Parallel) -> None:
    """Load a single-file checkpoint (whole tensors) into this rank's part of a sharded run.

    Each rank reads the whole file and keeps its part: an expert weight first its EP block
    of rows, then (as any DTensor parameter) its shard of that, by `distribute_tensor` with
    the parameter's own mesh and placements. The optimizer state of a single-file
    checkpoint is keyed by position in the unsharded AdamW groups (`optim.param_groups`:
    matrices, then gains and biases); cutting a model up keeps its parameters' order, so
    position i is the same parameter here.
    """
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor, distribute_tensor

    from blockdsl.train.optim import param_groups

    whole = load_file(str(weights))
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)  # save_model keeps one name of a shared one

    def part(p: Tensor, full: Tensor) -> Tensor:
        """This rank's part of `full`, shaped like p (a DTensor for a DTensor)."""
        full = full.to(p.device)
        if id(p) in par.experts:  # p.shape: the EP block's (a DTensor's global shape)
            lo = par.mesh.get_local_rank("ep") * p.shape[0]
            full = full[lo: lo + p.shape[0]]
        if isinstance(p, DTensor):  # every rank has the whole tensor: slice, send nothing
            return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        return full

    params = [p for g in param_groups(model, 0.0) for p in g["params"]]
    with torch.no_grad():
        for p in params:
            name = next((n for n in aliases[id(p)] if n in whole), None)
            if name is None:
                raise ValueError(f"weights do not fit this model (missing {aliases[id(p)][0]})")
            local = p.to_local() if isinstance(p, DTensor) else p
            new = part(p, whole[name])
            local.copy_(new.to_local() if isinstance(new, DTensor) else new)
        for name, b in model.named_buffers():
            if name in whole:
                b.copy_(whole[name])
    if opt is None:
        return
    saved = optim_state["state"]
    for i, p in enumerate(params):
        if i not in saved:
            continue
        opt.state[p] = {k: (part(p, v).clone() if v.ndim > 0 else v.to(p.device).clone())
                        if torch.is_tensor(v) else v for k, v in saved[i].items()}
