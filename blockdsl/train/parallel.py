"""Sharded training: FSDP2 and expert parallelism over a 2-D (dp, ep) device mesh.

`Parallel.setup` turns a built, rank-0-identical model into this rank's part of it:
- `--ep N`: every routed module's stacked expert weights are cut along the expert dim to
  this rank's E/N block and the module gets an `nn.expert_parallel.ExpertParallel`, which
  routes over the global batch and sends rows to their experts' ranks. The ranks form a
  (dp, ep) mesh, ep the inner dim: ranks r and r+1 share an EP group, so an EP group's
  batch slices are adjacent. Expert weights are replicated over dp and their gradients
  summed over it.
- `--shard fsdp`: FSDP2 `fully_shard` (torch's own, as torchtitan uses it) over all ranks,
  with fp32 weights and gradient reduction under the run's autocast (see `_fully_shard`):
  first every layer shared by several applications (one FSDP unit, sharded once), then each
  block application unit, then the root. Expert weights under EP are left out
  (`ignored_params`): they are already split E-wise, and sharding them again over dp is not
  done here (see the README's note).
- Gradients: FSDP's reduce-scatter averages its parameters over all ranks; `reduce_grads`
  does the rest (replicated parameters: one flat all-reduce; experts: a sum over dp), so a
  step equals one process's step on the global batch. `clip_grad_norm` forms the global
  norm from sharded, expert and replicated gradients (torch's own cannot mix DTensor and
  plain gradients).
- Checkpoints: `torch.distributed.checkpoint` (DCP) of the model and optimizer state dicts,
  expert blocks presented as DTensors sharded along dim 0 so DCP records global shapes and
  offsets; so a checkpoint saved at one world size (or layout) loads at another, or in one
  process, and `checkpoint.to_single_file` converts it to the folder format the rest of blockdsl reads.

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
            par._fully_shard(model)
        return par

    def _split_experts(self, model: nn.Module) -> None:
        ep_rank = self.mesh.get_local_rank("ep")
        ctx = ExpertParallel(self.mesh.get_group("ep"), ep_rank, self.ep,
                             tdist.group.WORLD, self.dist.rank, self.dist.world)
        fqns: dict[int, list[str]] = {}
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
        ids = {id(getattr(m, a)) for m in mods for a in _weights_of(m)
               if getattr(m, a) is not None}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in ids:
                fqns.setdefault(id(p), []).append(name)
        self.experts = {k: tuple(v) for k, v in fqns.items()}

    def _fully_shard(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

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
        kw = {"mesh": world_mesh, "mp_policy": mp, "ignored_params": ignored or None}
        uses: dict[int, int] = {}
        for _, m in model.named_modules(remove_duplicate=False):
            uses[id(m)] = uses.get(id(m), 0) + 1
        units = list(getattr(model, "units", None) or [])
        inside: set[int] = set()
        for m in model.modules():  # pre-order: the outermost shared layer comes first
            if m is model or id(m) in inside or uses[id(m)] < 2:
                continue
            if any(p not in ignored for p in m.parameters()):  # shared: one FSDP unit, once
                fully_shard(m, **kw)
                inside.update(id(c) for c in m.modules())
        for u in units:
            fully_shard(u, **kw)
        fully_shard(model, **kw)

    # -- the step's hooks

    def reduce_grads(self, params: list[nn.Parameter]) -> None:
        """Average what FSDP does not: replicated parameters over all ranks; experts summed
        over dp and divided by the world (their EP group's tokens already summed in)."""
        from torch.distributed.tensor import DTensor

        rep = [p for p in params if id(p) not in self.experts and not isinstance(p, DTensor)]
        self.dist.average_grads(rep)
        exp = [p for p in params if id(p) in self.experts]
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
        sums = torch.zeros(3, dtype=torch.float32, device=dev)  # replicated, sharded, expert
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

    def _wrap_experts(self, msd: dict[str, Any], osd: dict[str, Any]) -> None:
        """Present expert blocks as DTensors on the (dp, ep) mesh, sharded along dim 0."""
        if not self.experts:
            return
        from torch.distributed.tensor import DTensor, Replicate, Shard

        names = {n for v in self.experts.values() for n in v}
        wrap = lambda t: DTensor.from_local(t, self.mesh, [Replicate(), Shard(0)],  # noqa: E731
                                            run_check=False)
        for k in list(msd):
            if k in names:
                msd[k] = wrap(msd[k])
        for k, v in osd.items():  # flattened: "state.<fqn>.<exp_avg|exp_avg_sq|step>"
            if isinstance(v, Tensor) and v.ndim > 0 and _state_fqn(k) in names:
                osd[k] = wrap(v)

    def optimizer_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each AdamW group split into its DTensor (FSDP) and plain (expert, replicated)
        parameters: fused and foreach kernels take one kind per group, and AdamW steps
        group by group. Checkpoints store optimizer state per parameter, so the grouping
        may differ between the run that saved and the one that loads."""
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
                 par: Parallel | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if opt is None:
        msd, osd = get_model_state_dict(model), {}
    else:  # flattened: per-parameter keys, independent of how parameters are grouped
        msd, osd = get_state_dict(model, opt, options=_flat())
    if par is not None:
        par._wrap_experts(msd, osd)
    return {"model": msd, "optim": osd} if opt is not None else {"model": msd}


def save_sharded(folder: Path, model: nn.Module, opt: torch.optim.Optimizer,
                 par: Parallel) -> None:
    """Every rank writes its shards of the model and optimizer state into `folder` (DCP)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state_dicts(model, opt, par), checkpoint_id=str(folder))


def load_sharded(folder: Path, model: nn.Module, opt: torch.optim.Optimizer | None,
                 par: Parallel | None) -> None:
    """Load a DCP checkpoint into this rank's part of `model` (and `opt`), at any layout.

    `par` None (one process, or plain data parallel): every rank reads whole tensors.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.tensor import DTensor

    sd = _state_dicts(model, opt, par)
    no_dist = par is None or not par.active
    with warnings.catch_warnings():  # DCP warns that one process reads alone: that is meant
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(sd, checkpoint_id=str(folder), no_dist=no_dist)
    names = {n for v in (par.experts if par else {}).values() for n in v}
    unwrap = lambda k, v: v.to_local() if k in names and isinstance(v, DTensor) else v  # noqa: E731
    msd = {k: unwrap(k, v) for k, v in sd["model"].items()}
    if opt is None:
        model.load_state_dict(msd) if par is None else set_state_dict(
            model, [], model_state_dict=msd, optim_state_dict={})
        return
    osd = {k: unwrap(_state_fqn(k), v) for k, v in sd["optim"].items()}
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd, options=_flat())



def load_whole(weights: Path, optim_state: dict[str, Any], model: nn.Module,
               opt: torch.optim.Optimizer | None, par: Parallel) -> None:
    """Load a single-file checkpoint (whole tensors) into this rank's part of a sharded run.

    Each rank reads the whole file and keeps its part: a DTensor parameter its shard
    (`distribute_tensor` with the parameter's own mesh and placements), an expert block its
    rows. The optimizer state of a single-file checkpoint is keyed by position in the
    unsharded AdamW groups (`optim.param_groups`: matrices, then gains and biases); cutting
    a model up keeps its parameters' order, so position i is the same parameter here.
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
        if isinstance(p, DTensor):  # every rank has the whole tensor: slice, send nothing
            return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        if id(p) in par.experts:
            lo = par.mesh.get_local_rank("ep") * p.shape[0]
            return full[lo: lo + p.shape[0]]
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
