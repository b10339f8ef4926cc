"""SwitchHead attention (Csordás et al. 2024), MoEUT's attention: per-head V and O experts.

Why experts only on V and O: Q and K decide *where* to attend and stay dense; which value
and output projection a head uses is chosen per token, so a few heads with expert V/O match
a wider dense attention at a fraction of the attention matrices.

Layout (the parameter counter depends on it):
- qk: one fused Linear(d, 2 H dh, bias=False);
- v [H*E, d, dh], o [H*E, dh, d]; row h*E + e is head h's expert e;
- sel_v, sel_o [H*E, d] when E > 1: per head, top-k of sigmoid(x_sel . s) picks V and O
  experts independently; the gates are the sigmoid scores; O sums over heads and experts;
- E == 1 (MoEUT's code): dense V and O, no sel_v, and sel_o [H, d] is a sigmoid output
  gate per head (o_h scaled by sigmoid(x_sel . s_h) before the output projection).
Parameters: E > 1: 2 H dh d + 2 H E d dh + 2 H E d;  E == 1: 4 H dh d + H d.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockdsl.nn import aux
from blockdsl.nn.dispatch import IMPLS, expert_mixture
from blockdsl.nn.moe import renorm_rows_keep_std
from blockdsl.nn.rope import apply_rope


SELECTOR_INITS = ("row_std", "keep_std")


@torch.no_grad()
def renorm_rows_own_std(w: Tensor) -> None:
    """Unit-normalise each row, then scale it by its own pre-normalisation std over the
    normalised tensor's std (SwitchHead's selector init in MoEUT's code).

    Unlike `renorm_rows_keep_std` (the sigma-MoE selector's), rows keep unequal norms, in
    proportion to their initial std: row i ends with norm s_i / std(w / |w|_rows).
    """
    row_std = w.std(dim=-1, keepdim=True)
    w.div_(w.norm(dim=-1, keepdim=True))
    w.mul_(row_std / w.std())


class SwitchHeadAttention(nn.Module):
    """Self-attention over x [B, T, d] with expert V/O projections (MoEUT's SwitchHead).

    q and k are each scaled by dh^-0.25 (so q.k carries the usual 1/sqrt(dh)); RoPE turns
    the first `rope_fraction` of each head's dims. Peri-norm: Q, K and both selectors read
    x_norm, V reads x. Regulariser "entropy_attn": the entropy of each head's selector
    softmax marginal (V and O separately), pooled over time and applications, times
    -entropy_weight. With experts == 1 there is no selection and no regulariser; `k` is
    then unused. Init per MoEUT with std scale sqrt(2 / n_applications), n_applications =
    the number of layer applications in the whole stack. `selector_init` renormalises the
    V/O selector rows: "row_std" as MoEUT's code does for SwitchHead (each row scaled by
    its own std, so norms stay unequal), "keep_std" as its sigma-MoE selector (equal norms).
    `ep`: set by expert parallelism (`nn.expert_parallel`) when v and o hold this rank's
    block of rows; None: all here.
    """

    ep = None

    def __init__(
        self,
        d: int,
        heads: int,
        head_dim: int,
        experts: int,
        k: int = 2,
        causal: bool = True,
        rope: bool = True,
        rope_fraction: float = 0.5,
        rope_base: float = 10000.0,
        entropy_weight: float = 0.001,
        dispatch: str = "auto",
        n_applications: int = 1,
        selector_init: str = "row_std",
    ) -> None:
        super().__init__()
        if experts < 1 or heads < 1 or head_dim < 1:
            raise ValueError(f"heads, head_dim, experts must be >= 1, got {heads}, {head_dim}, {experts}")
        if experts > 1 and not 1 <= k <= experts:
            raise ValueError(f"top-k routing needs 1 <= k <= experts, got k={k} with experts={experts}")
        if dispatch not in IMPLS:
            raise ValueError(f"unknown dispatch {dispatch!r}; expected one of {', '.join(IMPLS)}")
        self.d, self.heads, self.head_dim, self.experts, self.k = d, heads, head_dim, experts, k
        self.causal, self.rope = causal, rope
        self.rope_fraction, self.rope_base = rope_fraction, rope_base
        self.entropy_weight, self.dispatch = entropy_weight, dispatch
        if selector_init not in SELECTOR_INITS:
            raise ValueError(f"unknown selector_init {selector_init!r}; expected one of "
                             f"{', '.join(SELECTOR_INITS)}")
        self.n_applications, self.selector_init = n_applications, selector_init
        he = heads * experts
        self.qk = nn.Linear(d, 2 * heads * head_dim, bias=False)
        self.v = nn.Parameter(torch.empty(he, d, head_dim))
        self.o = nn.Parameter(torch.empty(he, head_dim, d))
        self.sel_v = nn.Parameter(torch.empty(he, d)) if experts > 1 else None
        self.sel_o = nn.Parameter(torch.empty(he, d))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        scale = math.sqrt(2.0 / self.n_applications)
        std_in = scale / math.sqrt(self.d)
        nn.init.normal_(self.qk.weight, 0.0, std_in)
        nn.init.normal_(self.v, 0.0, std_in)
        nn.init.normal_(self.o, 0.0, scale / math.sqrt(self.heads * self.head_dim))
        for sel in (self.sel_v, self.sel_o):
            if sel is not None:
                nn.init.normal_(sel, 0.0, std_in)
                if self.selector_init == "row_std":
                    renorm_rows_own_std(sel)
                else:
                    renorm_rows_keep_std(sel)

    def _select(self, x_sel: Tensor, weight: Tensor, key: str) -> tuple[Tensor, Tensor]:
        """Per-head top-k experts of [N, d] -> (flat expert row h*E + e, gate), [N*H*k]."""
        b_t = x_sel.shape[:-1]
        h, e = self.heads, self.experts
        with torch.autocast(x_sel.device.type, enabled=False):
            logits = F.linear(x_sel.float(), weight.float()).view(*b_t, h, e)
        aux.record_marginal_entropy(
            "entropy_attn", (self, key), logits.log_softmax(-1), self.entropy_weight
        )
        gate, idx = logits.sigmoid().topk(self.k, dim=-1)  # [B, T, H, k]
        row = idx + torch.arange(h, device=idx.device).view(h, 1) * e
        return row.reshape(-1), gate.reshape(-1)

    def forward(self, x: Tensor, x_norm: Tensor | None = None) -> Tensor:
        b, t, d = x.shape
        h, dh, n = self.heads, self.head_dim, b * t
        xq = x if x_norm is None else x_norm
        q, k = self.qk(xq).view(b, t, 2, h, dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, dh]
        s = dh**-0.25
        q, k = q * s, k * s
        if self.rope:
            q = apply_rope(q, self.rope_base, self.rope_fraction)
            k = apply_rope(k, self.rope_base, self.rope_fraction)

        # expert-path rows: assignment (token n, head h, choice j) in that order
        token = torch.arange(n, device=x.device).repeat_interleave(h * self.k)
        head = torch.arange(h, device=x.device).repeat_interleave(self.k).repeat(n)
        if self.experts == 1:
            v = F.linear(x, self.v.permute(0, 2, 1).reshape(h * dh, d))  # dense, [B, T, H*dh]
            v = v.view(b, t, h, dh).transpose(1, 2)
        else:
            # rows of the V result are (token, head): the k experts of a head sum into one row
            row, gate = self._select(xq, self.sel_v, "v")
            v = expert_mixture(
                x.reshape(n, d), token, row, gate, self.v,
                dst=token * h + head, n_out=n * h, impl=self.dispatch, ep=self.ep,
            )  # fmt: skip
            v = v.view(b, t, h, dh).transpose(1, 2)

        att = F.scaled_dot_product_attention(q, k, v.to(q.dtype), is_causal=self.causal, scale=1.0)
        att = att.transpose(1, 2)  # [B, T, H, dh]

        if self.experts == 1:
            with torch.autocast(x.device.type, enabled=False):
                o_gate = F.linear(xq.float(), self.sel_o.float()).sigmoid()  # [B, T, H]
            att = att * o_gate.unsqueeze(-1).to(att.dtype)
            return F.linear(att.reshape(b, t, h * dh), self.o.reshape(h * dh, d).t())

        row, gate = self._select(xq, self.sel_o, "o")
        out = expert_mixture(
            att.reshape(n * h, dh), token * h + head, row, gate, self.o,
            dst=token, n_out=n, impl=self.dispatch, ep=self.ep,
        )  # fmt: skip
        return out.view(b, t, d)
