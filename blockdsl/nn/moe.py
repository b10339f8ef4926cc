"""Mixture-of-experts FFN layers: token-choice top-k, expert choice, and MoEUT's sigma-MoE.

Each layer only decides *who goes where with what gate* and then hands flat assignments
(token, expert, gate) to `dispatch.expert_mixture`, which owns the expert computation.
Routers run in fp32 (with autocast off) because softmax/top-k ties and the auxiliary
losses are precision-sensitive, while the experts follow autocast.

Sub-layer contract: forward(x, x_norm=None) maps [B, T, d] -> [B, T, d] without the
residual; with MoEUT's peri-norm the router/selector reads x_norm and the experts read x.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockdsl.nn import aux
from blockdsl.nn.dispatch import IMPLS, expert_mixture
from blockdsl.nn.dispatch import fused as fused_router
from blockdsl.nn.ffn import FeedForward, is_gated

GROUPS = ("batch", "position")


def _check_topk(k: int, experts: int) -> None:
    if experts < 1:
        raise ValueError(f"experts must be >= 1, got {experts}")
    if not 1 <= k <= experts:
        raise ValueError(f"top-k routing needs 1 <= k <= experts, got k={k} with experts={experts}")


def _check_dispatch(dispatch: str) -> None:
    if dispatch not in IMPLS:
        raise ValueError(f"unknown dispatch {dispatch!r}; expected one of {', '.join(IMPLS)}")


def _router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """fp32 router logits, outside autocast: top-k choices must not flip with precision."""
    if not torch.is_autocast_enabled(x.device.type):  # the context itself costs ~7 us
        return F.linear(x.float(), weight.float())
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())


def _softmax_experts(logits: Tensor, log: bool = False) -> Tensor:
    """(log-)softmax over the experts (last dim) of [N, E] router logits.

    ATen's CPU (log_)softmax over a last dim shorter than its vector width takes a slow
    scalar path; the same reduction over dim 0 of a transposed copy is vectorised along the
    tokens. Measured, 1 thread, softmax + top-2 forward and backward: N = 1024, E = 8:
    1336 us native vs 602 us transposed (4096 x 8: 5494 vs 2490; E = 12: 1867 vs 956), but
    E = 16: 816 vs 1477 and E = 32: 2267 vs 2853 (top-k over the strided result loses), so
    only E < 16 on CPU takes it. Same math; the result is a transposed view.
    """
    if logits.device.type == "cpu" and logits.dim() == 2 and logits.shape[-1] < 16:
        t = logits.t().contiguous()
        return (t.log_softmax(0) if log else t.softmax(0)).t()
    return logits.log_softmax(-1) if log else logits.softmax(-1)


@torch.no_grad()
def renorm_rows_keep_std(w: Tensor) -> None:
    """Give every row the same norm while keeping the tensor's std (MoEUT's selector init).

    Equal-norm selector rows mean no expert starts out favoured by a larger row.
    """
    std = w.std()
    w.div_(w.norm(dim=-1, keepdim=True))
    w.mul_(std / w.std())


class _StackedExperts(nn.Module):
    """E two-layer FFN experts stored as [E, ...] tensors so dispatch can group their matmuls.

    Parameters: router d*E; w1 E*d*g*d_ff (g = 2 if gated); w2 E*d_ff*d; with bias b1
    E*g*d_ff and b2 E*d; plus the shared FeedForward when shared_d_ff > 0.
    `ep`: set by expert parallelism (`nn.expert_parallel`) on a model whose expert
    weights it sharded; None runs everything here.
    """

    ep = None

    def __init__(
        self,
        d: int,
        d_ff: int,
        experts: int,
        activation: str,
        bias: bool,
        shared_d_ff: int,
        dispatch: str,
    ) -> None:
        super().__init__()
        _check_dispatch(dispatch)
        if experts < 1:
            raise ValueError(f"experts must be >= 1, got {experts}")
        g = 2 if is_gated(activation) else 1
        self.d, self.d_ff, self.experts = d, d_ff, experts
        self.activation, self.dispatch = activation, dispatch
        self.router = nn.Linear(d, experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(experts, d, g * d_ff))
        self.b1 = nn.Parameter(torch.empty(experts, g * d_ff)) if bias else None
        self.w2 = nn.Parameter(torch.empty(experts, d_ff, d))
        self.b2 = nn.Parameter(torch.empty(experts, d)) if bias else None
        self.shared = FeedForward(d, shared_d_ff, activation, bias) if shared_d_ff > 0 else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each expert initialised like an nn.Linear pair (uniform, bound 1/sqrt(fan_in))."""
        for w, b, fan_in in ((self.w1, self.b1, self.d), (self.w2, self.b2, self.d_ff)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def _mix(
        self, x: Tensor, token: Tensor, expert: Tensor, gate: Tensor, skipped: bool,
        max_load: int | None = None,
    ) -> Tensor:
        out = expert_mixture(
            x, token, expert, gate, self.w1, self.b1, self.w2, self.b2,
            activation=self.activation, impl=self.dispatch, skipped=skipped, max_load=max_load,
            ep=self.ep,
        )  # fmt: skip
        if self.shared is not None:
            out = out + self.shared(x)
        return out


class TopKMoE(_StackedExperts):
    """Token-choice top-k MoE (Shazeer 2017, GShard, Switch; WideNet's MoE).

    Softmax router (+ Gaussian logit noise of std `router_noise` in training; WideNet uses
    1/E); each token takes its k most probable experts, gate = probability (renormalised
    over the k if `renormalize`). `capacity_factor` None is dropless; otherwise each expert
    takes at most C = int(B*T * capacity_factor * k / E) assignments per forward, first
    choices before second choices and earlier tokens first; the rest are dropped (the
    residual carries the token). Aux: balance = w * E * sum_e f_e P_e (Switch; f_e over
    all k choices, before dropping) and z = w * mean(logsumexp(logits)^2), from the clean
    logits. `expert_dropout` p masks each expert with probability p per training forward
    (at least one kept).
    """

    def __init__(
        self,
        d: int,
        d_ff: int,
        experts: int,
        k: int,
        activation: str = "gelu",
        bias: bool = True,
        capacity_factor: float | None = None,
        renormalize: bool = False,
        router_noise: float = 0.0,
        balance_weight: float = 0.0,
        z_weight: float = 0.0,
        shared_d_ff: int = 0,
        expert_dropout: float = 0.0,
        dispatch: str = "auto",
    ) -> None:
        _check_topk(k, experts)
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {capacity_factor}")
        if not 0.0 <= expert_dropout < 1.0:
            raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout}")
        super().__init__(d, d_ff, experts, activation, bias, shared_d_ff, dispatch)
        self.k = k
        self.capacity_factor = capacity_factor
        self.renormalize = renormalize
        self.router_noise = router_noise
        self.balance_weight, self.z_weight = balance_weight, z_weight
        self.expert_dropout = expert_dropout

    def capacity(self, n_tokens: int) -> int | None:
        """Per-expert slots for one forward of n_tokens (GShard/WideNet form)."""
        if self.capacity_factor is None:
            return None
        # torch.sym_int (= int() here) and, below, sym_min and a ceil written with sym_ite
        # keep a symbolic token count symbolic under torch.export and are ops a
        # saved program can hold; int()/min() would pin it, math.floor/ceil do not save
        return torch.sym_int(n_tokens * self.capacity_factor * self.k / self.experts)

    def route(self, sel: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
        """Router input [N, d] -> flat (token, expert, gate) in rank-major order, skipped flag.

        Assignment m = r * N + n is token n's r-th choice; a dropped one gets expert id E.
        """
        n, e = sel.shape[0], self.experts
        logits = _router_logits(sel, self.router.weight)
        if self.z_weight:
            aux.record("z", self.z_weight * torch.logsumexp(logits, -1).square().mean())
        if self.training and self.router_noise > 0:
            logits = logits + torch.randn_like(logits) * self.router_noise
        dropped_expert = None
        if self.training and self.expert_dropout > 0:
            r = torch.rand(e, device=logits.device)
            dropped_expert = (r < self.expert_dropout) & (r != r.max())  # the max r survives
            logits = logits.masked_fill(dropped_expert, float("-inf"))
        if self.dispatch in ("auto", "fused") and fused_router.routes_here(logits):
            # one C++ pass, the same function (nn/dispatch/fused.py); not once a traced
            # model's dispatch is swapped for "sort" (nn/traceable)
            gate, expert, token, counts, mean_p = fused_router.topk_route(
                logits, self.k, self.renormalize)
        else:
            probs = _softmax_experts(logits)
            top_p, top_i = probs.topk(self.k, dim=-1)  # [N, k]
            gate = top_p / top_p.sum(-1, keepdim=True) if self.renormalize else top_p
            counts = mean_p = None
            if self.balance_weight:
                counts = torch.bincount(top_i.reshape(-1), minlength=e).to(probs.dtype)
                mean_p = probs.mean(0)
            expert = top_i.t().reshape(-1)
            token = torch.arange(n, device=sel.device).repeat(self.k)
            gate = gate.t().reshape(-1)
        if self.balance_weight:
            # w E sum_e f_e P_e with f_e = count_e / (N k): one dot product
            scale = self.balance_weight * e / (n * self.k)
            aux.record("balance", torch.dot(counts, mean_p) * scale)
        skipped = False
        if dropped_expert is not None:  # fewer than k experts left: skip the masked picks
            expert = torch.where(dropped_expert[expert], e, expert)
            skipped = True
        cap = self.capacity(n)
        if cap is not None:
            keep = self._within_capacity(expert, cap)
            expert = torch.where(keep, expert, e)
            skipped = True
        return token, expert, gate, skipped

    def _within_capacity(self, expert: Tensor, cap: int) -> Tensor:
        """True for the first `cap` assignments of each expert in rank-major order."""
        m = expert.shape[0]
        order = torch.argsort(expert, stable=True)  # stable: keeps (rank, token) order
        sorted_e = expert[order]
        starts = torch.searchsorted(sorted_e, torch.arange(self.experts + 1, device=expert.device))
        pos = torch.empty_like(order)
        pos[order] = torch.arange(m, device=expert.device) - starts[sorted_e]
        return pos < cap

    def forward(self, x: Tensor, x_norm: Tensor | None = None) -> Tensor:
        if self.ep is not None:  # routing over the global batch, experts on their ranks
            return self.ep.routed_forward(self, x, x_norm)
        b, t, d = x.shape
        sel = (x if x_norm is None else x_norm).reshape(b * t, d)
        token, expert, gate, skipped = self.route(sel)
        out = self._mix(x.reshape(b * t, d), token, expert, gate, skipped, self.capacity(b * t))
        return out.view(b, t, d)


class ExpertChoiceMoE(_StackedExperts):
    """Expert-choice routing (Zhou et al. 2022; Brainformer): experts pick their tokens.

    Softmax over experts per token; within each group every expert takes its top-C tokens
    by that score, C = min(S, ceil(S * capacity_factor / E)) for group size S; the gate is
    the score; a token gets 0..E experts; no aux loss. group "batch": all B*T tokens form
    one group (a token's routing depends on later tokens: only for non-causal models).
    group "position": the B tokens at one position t form a group, so nothing crosses
    positions and a causal decoder stays causal (needs B > 1 to be a real choice).
    """

    def __init__(
        self,
        d: int,
        d_ff: int,
        experts: int,
        capacity_factor: float = 2.0,
        activation: str = "gelu",
        bias: bool = True,
        group: str = "batch",
        dispatch: str = "auto",
    ) -> None:
        if group not in GROUPS:
            raise ValueError(f"unknown expert-choice group {group!r}; expected one of {GROUPS}")
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
        super().__init__(d, d_ff, experts, activation, bias, 0, dispatch)
        self.capacity_factor = capacity_factor
        self.group = group

    def capacity(self, group_size: int) -> int:
        x = group_size * self.capacity_factor / self.experts
        c = torch.sym_int(x)  # math.ceil(x) for x > 0, in ops a saved program can hold
        return torch.sym_min(group_size, torch.sym_ite(x > c, c + 1, c))

    def route(self, sel: Tensor, b: int, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """Router input [B*T, d] -> flat (token, expert, gate), expert-major."""
        e = self.experts
        # the CPU-vectorised softmax of few experts (a transposed view; see _softmax_experts)
        probs = _softmax_experts(_router_logits(sel, self.router.weight))  # [N, E]
        if self.group == "batch":
            scores = probs.unsqueeze(0)  # [1, N, E]: one group
        else:
            scores = probs.reshape(b, t, e).transpose(0, 1)  # [T, B, E]: group = position
        c = self.capacity(scores.shape[1])
        gate, member = scores.topk(c, dim=1)  # [G, C, E]
        if self.group == "batch":
            token = member
        else:
            token = member * t + torch.arange(t, device=sel.device).view(t, 1, 1)
        expert = torch.arange(e, device=sel.device).expand_as(token)
        flat = lambda z: z.permute(2, 0, 1).reshape(-1)  # noqa: E731  expert-major
        return flat(token), flat(expert), flat(gate)

    def forward(self, x: Tensor, x_norm: Tensor | None = None) -> Tensor:
        if self.ep is not None:  # routing over the global batch, experts on their ranks
            return self.ep.routed_forward(self, x, x_norm)
        b, t, d = x.shape
        sel = (x if x_norm is None else x_norm).reshape(b * t, d)
        token, expert, gate = self.route(sel, b, t)
        load = token.shape[0] // self.experts  # every expert takes exactly C per group
        out = self._mix(x.reshape(b * t, d), token, expert, gate, False, load)
        return out.view(b, t, d)


class SigmaMoE(nn.Module):
    """MoEUT's sigma-MoE FFN (Csordás et al. 2023/2024): sigmoid gates, no renormalisation.

    Parameters: keys E*d*g*es, values E*es*d, selector E*d (no biases; g = 2 if gated).
    y = sum_{e in topk} sigmoid(x_sel . s_e) * act(x K_e) V_e. Regulariser: the entropy of
    the selector softmax marginal, pooled over time and all applications of this module,
    recorded as "entropy_ffn" (-entropy_weight * H). Expert dropout (MoEUT's form): in
    training each (token, expert) score is masked with probability p before the top-k; the
    gates of the chosen experts are their unmasked scores. Init per MoEUT: std scale
    sqrt(2 / n_applications), where n_applications is the number of layer applications in
    the whole stack (MoEUT: n_layers = G x repeats). `ep`: see `_StackedExperts`.
    """

    ep = None

    def __init__(
        self,
        d: int,
        expert_size: int,
        experts: int,
        k: int,
        activation: str = "relu",
        entropy_weight: float = 0.01,
        expert_dropout: float = 0.0,
        dispatch: str = "auto",
        n_applications: int = 1,
    ) -> None:
        super().__init__()
        _check_topk(k, experts)
        _check_dispatch(dispatch)
        if not 0.0 <= expert_dropout < 1.0:
            raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout}")
        g = 2 if is_gated(activation) else 1
        self.d, self.expert_size, self.experts, self.k = d, expert_size, experts, k
        self.activation, self.dispatch = activation, dispatch
        self.entropy_weight, self.expert_dropout = entropy_weight, expert_dropout
        self.n_applications = n_applications
        self.keys = nn.Parameter(torch.empty(experts, d, g * expert_size))
        self.values = nn.Parameter(torch.empty(experts, expert_size, d))
        self.selector = nn.Parameter(torch.empty(experts, d))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        scale = math.sqrt(2.0 / self.n_applications)
        nn.init.normal_(self.keys, 0.0, scale / math.sqrt(self.d))
        nn.init.normal_(self.values, 0.0, scale / math.sqrt(self.experts * self.expert_size))
        nn.init.normal_(self.selector, 0.0, scale / math.sqrt(self.d))
        renorm_rows_keep_std(self.selector)

    def forward(self, x: Tensor, x_norm: Tensor | None = None) -> Tensor:
        b, t, d = x.shape
        n = b * t
        logits = _router_logits((x if x_norm is None else x_norm).reshape(n, d), self.selector)
        aux.record_marginal_entropy(
            "entropy_ffn", self, _softmax_experts(logits, log=True).view(b, t, -1), self.entropy_weight
        )
        scores = logits.sigmoid()
        if self.training and self.expert_dropout > 0:
            masked = scores.masked_fill(torch.rand_like(scores) < self.expert_dropout, -1.0)
            idx = masked.topk(self.k, dim=-1).indices
            gate = scores.gather(-1, idx)
        else:
            gate, idx = scores.topk(self.k, dim=-1)
        token = torch.arange(n, device=x.device).repeat_interleave(self.k)
        out = expert_mixture(
            x.reshape(n, d), token, idx.reshape(-1), gate.reshape(-1), self.keys, None,
            self.values, None, activation=self.activation, impl=self.dispatch, ep=self.ep,
        )  # fmt: skip
        return out.view(b, t, d)
