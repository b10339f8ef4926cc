"""Expert parallelism: each rank of an EP group holds E/N experts; tokens travel by all_to_all.

A routed module with an `ep` attribute (an `ExpertParallel`, set by
`blockdsl.train.parallel`) keeps only its own rank's block of experts along dim 0 of its
stacked expert weights ([E/N, ...]); everything else (routers, selectors, shared FFN,
attention's Q/K) stays whole on every rank.

Design choices, each for a reason:
- Routing is computed on the router inputs of the *whole global batch*, gathered from every
  rank of the routing group (all ranks: EP x DP), and each rank keeps the assignments of its
  own tokens. Top-k with capacity (positions in first-choice-first, earlier-token-first order,
  C from the global token count), expert choice (groups span the batch) and the Switch
  balance loss are functions of the whole batch; computing them from the gathered inputs
  makes them identical to one process by construction, where all-reducing counts would
  re-implement each rule a second time. The cost is one [N_global, d] all-gather and a
  replicated router matmul per routed layer (d*E FLOPs per token against the experts'
  k*d*d_ff*2), small next to the experts. SigmaMoE and SwitchHead route every token on its
  own (no capacity, per-sequence entropy), so they skip the gather and only exchange.
- The gather is differentiable: its backward all-reduces the gradient and keeps this rank's
  rows. Every rank computes the same global aux loss, so a token's router input receives the
  aux gradient from all N ranks; the step then averages gradients over ranks (dividing by
  N), which leaves exactly one process's gradient. (all_reduce rather than reduce_scatter
  because gloo has no reduce_scatter.)
- The exchange: assignments are sorted by owner rank, their input rows sent with
  `all_to_all_single` (split sizes exchanged first), the owner runs the ordinary
  `expert_mixture` on them with its local experts and unit gates (so every dispatch backend
  serves EP unchanged), the per-assignment outputs travel back by the reverse all_to_all, and
  the source rank applies the gates and scatter-adds into its rows in fp32. Gates stay on the
  source rank, so their gradient needs no communication. The all_to_all's backward is the
  reverse all_to_all; it always runs, even with nothing to send, because it is a collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with given split sizes; the backward swaps the splits."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, send: list[int], recv: list[int], group: Any) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return back, None, None, None


class _Gather(torch.autograd.Function):
    """Concatenate equal-sized row blocks from every rank of `group` (rank order)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any, rank: int, size: int) -> Tensor:
        ctx.group, ctx.rank, ctx.rows = group, rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        lo = ctx.rank * ctx.rows
        return grad[lo: lo + ctx.rows], None, None, None


class ExpertParallel:
    """One EP layout: the EP group (experts split over it) and the routing group (all ranks).

    `ep_rank`/`ep_size`: this rank's place in its EP group; `route_rank`/`route_size`: its
    place among all ranks whose tokens form one global batch, in batch order.
    """

    def __init__(self, ep_group: Any, ep_rank: int, ep_size: int,
                 route_group: Any, route_rank: int, route_size: int) -> None:
        self.ep_group, self.ep_rank, self.ep_size = ep_group, ep_rank, ep_size
        self.route_group, self.route_rank, self.route_size = route_group, route_rank, route_size

    def local_range(self, n_experts: int) -> tuple[int, int]:
        """The [lo, hi) block of the stacked expert dim this rank holds."""
        if n_experts % self.ep_size:
            raise ValueError(f"{n_experts} experts do not split evenly over {self.ep_size} EP ranks")
        per = n_experts // self.ep_size
        return self.ep_rank * per, (self.ep_rank + 1) * per

    def gather(self, rows: Tensor) -> Tensor:
        """This rank's [N, ...] rows -> the global batch's [route_size * N, ...] rows."""
        if self.route_size == 1:
            return rows
        return _Gather.apply(rows, self.route_group, self.route_rank, self.route_size)

    def routed_forward(self, mod: Any, x: Tensor, x_norm: Tensor | None) -> Tensor:
        """A TopKMoE or ExpertChoiceMoE forward with global routing and local experts."""
        from blockdsl.nn.moe import ExpertChoiceMoE  # same stage; lazily, to avoid a cycle

        b, t, d = x.shape
        n = b * t
        sel = self.gather((x if x_norm is None else x_norm).reshape(n, d))
        if isinstance(mod, ExpertChoiceMoE):
            token, expert, gate = mod.route(sel, b * self.route_size, t)
            skipped = False
        else:
            token, expert, gate, skipped = mod.route(sel)
        lo = self.route_rank * n
        mine = (token >= lo) & (token < lo + n)
        token, expert, gate = token[mine] - lo, expert[mine], gate[mine]
        x2 = x.reshape(n, d)
        out = self.mixture(x2, token, expert, gate, mod.w1, mod.b1, mod.w2, mod.b2,
                           activation=mod.activation, impl=mod.dispatch, skipped=skipped)
        if mod.shared is not None:
            out = out + mod.shared(x2)
        return out.view(b, t, d)

    def mixture(self, x: Tensor, src: Tensor, expert: Tensor, gate: Tensor, w1: Tensor,
                b1: Tensor | None = None, w2: Tensor | None = None, b2: Tensor | None = None,
                *, activation: str = "none", dst: Tensor | None = None,
                n_out: int | None = None, impl: str = "auto", skipped: bool = False,
                max_load: int | None = None) -> Tensor:
        """`expert_mixture` with global expert ids and this rank's block of expert weights.

        Same contract and result as `nn.dispatch.expert_mixture` on the full weights;
        `max_load` is not used (an owner's load is the sum over source ranks).
        """
        from blockdsl.nn.dispatch import expert_mixture

        per = w1.shape[0]
        n_exp = per * self.ep_size
        dst = src if dst is None else dst
        n_out = x.shape[0] if n_out is None else n_out
        if skipped:  # dropped assignments (id == E) never travel
            keep = expert < n_exp
            src, expert, gate, dst = src[keep], expert[keep], gate[keep], dst[keep]
        owner = torch.div(expert, per, rounding_mode="floor")
        order = torch.argsort(owner, stable=True)
        src, expert, gate, dst, owner = (v.index_select(0, order)
                                         for v in (src, expert, gate, dst, owner))
        send_t = torch.bincount(owner, minlength=self.ep_size)
        recv_t = torch.empty_like(send_t)
        dist.all_to_all_single(recv_t, send_t, group=self.ep_group)
        send, recv = send_t.tolist(), recv_t.tolist()
        rows = _AllToAll.apply(x.index_select(0, src), send, recv, self.ep_group)
        local_e = torch.empty(sum(recv), dtype=expert.dtype, device=expert.device)
        dist.all_to_all_single(local_e, (expert - owner * per).contiguous(), recv, send,
                               group=self.ep_group)
        m = rows.shape[0]
        if m:
            ident = torch.arange(m, device=x.device)
            y = expert_mixture(rows, ident, local_e, torch.ones(m, device=x.device), w1, b1,
                               w2, b2, activation=activation, impl=impl)
        else:  # nothing to compute here; keep the path so the backward exchange still runs
            d_out = (w1 if w2 is None else w2).shape[-1]
            y = rows.sum() * 0 + x.new_zeros((0, d_out))
        back = _AllToAll.apply(y, recv, send, self.ep_group)
        out = torch.zeros(n_out, back.shape[1], device=x.device, dtype=torch.float32)
        out = out.index_add(0, dst, back.float() * gate.float().unsqueeze(1))
        return out.to(back.dtype)
