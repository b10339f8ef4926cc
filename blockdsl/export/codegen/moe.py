"""Standalone source of the routed primitives: token-choice top-k, expert choice, MoEUT's
sigma-MoE, and SwitchHead attention (its V/O projections are routed the same way)."""

from __future__ import annotations

from typing import Any

from blockdsl.export.codegen import Code
from blockdsl.export.codegen.attention import ROPE
from blockdsl.export.codegen.ffn import ACTIVATIONS, FEED_FORWARD

# blockdsl's reference dispatch ("loop"): one gather, FFN and scatter per expert.
DISPATCH = '''
def expert_mixture(x, src, expert, gate, w1, b1=None, w2=None, b2=None, activation="none",
                   dst=None, n_out=None):
    """out[dst_m] += gate_m * f_{expert_m}(x[src_m]) over assignments m, f_e(v) =
    act(v W1_e + b1_e) W2_e + b2_e (or v W1_e + b1_e without W2); an expert id equal to
    the number of experts is a dropped assignment. Accumulated in fp32."""
    dst = src if dst is None else dst
    n_out = x.shape[0] if n_out is None else n_out
    d_out = (w1 if w2 is None else w2).shape[-1]
    out = torch.zeros(n_out, d_out, device=x.device,
                      dtype=torch.promote_types(x.dtype, torch.float32))
    dtype = x.dtype
    for e in range(w1.shape[0]):
        idx = (expert == e).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        h = x[src[idx]] @ w1[e]
        if b1 is not None:
            h = h + b1[e]
        if w2 is not None:
            h = activate(h, activation) @ w2[e]
            if b2 is not None:
                h = h + b2[e]
        dtype = h.dtype
        out = out.index_add(0, dst[idx], gate[idx].unsqueeze(-1) * h.to(out.dtype))
    return out.to(dtype)


def router_logits(x, weight):
    """Router logits in fp32, whatever the input dtype."""
    return F.linear(x.float(), weight.float())


def softmax_experts(logits):
    """Softmax over the experts of [N, E] logits, the op sequence of the original model:
    below 16 experts on CPU over dim 0 of a transposed copy (ATen vectorises that along
    the tokens), so the probabilities round as they did there."""
    if logits.device.type == "cpu" and logits.dim() == 2 and logits.shape[-1] < 16:
        return logits.t().contiguous().softmax(0).t()
    return logits.softmax(-1)
'''

EXPERTS = '''
class StackedExperts(nn.Module):
    """E two-layer FFN experts as [E, ...] tensors, a router, an optional shared FFN."""

    def __init__(self, d, d_ff, experts, activation, bias, shared_d_ff):
        super().__init__()
        g = 2 if is_gated(activation) else 1
        self.experts, self.activation = experts, activation
        self.router = nn.Linear(d, experts, bias=False)
        self.w1 = nn.Parameter(torch.zeros(experts, d, g * d_ff))
        self.b1 = nn.Parameter(torch.zeros(experts, g * d_ff)) if bias else None
        self.w2 = nn.Parameter(torch.zeros(experts, d_ff, d))
        self.b2 = nn.Parameter(torch.zeros(experts, d)) if bias else None
        self.shared = FeedForward(d, shared_d_ff, activation, bias) if shared_d_ff else None

    def mix(self, x, token, expert, gate):
        out = expert_mixture(x, token, expert, gate, self.w1, self.b1, self.w2, self.b2,
                             self.activation)
        return out if self.shared is None else out + self.shared(x)
'''

TOPK = '''
class TopKMoE(StackedExperts):
    """Token-choice top-k: softmax router, each token's k most probable experts, gate =
    probability (renormalised over the k if asked); with a capacity factor each expert
    takes its first C = floor(N * factor * k / E) assignments (first choices first)."""

    def __init__(self, d, d_ff, experts, k, activation, bias, capacity_factor, renormalize,
                 shared_d_ff):
        super().__init__(d, d_ff, experts, activation, bias, shared_d_ff)
        self.k, self.capacity_factor, self.renormalize = k, capacity_factor, renormalize

    def forward(self, x, x_norm=None):
        b, t, d = x.shape
        n, e = b * t, self.experts
        sel = (x if x_norm is None else x_norm).reshape(n, d)
        probs = softmax_experts(router_logits(sel, self.router.weight))
        top_p, top_i = probs.topk(self.k, dim=-1)
        gate = top_p / top_p.sum(-1, keepdim=True) if self.renormalize else top_p
        expert = top_i.t().reshape(-1)  # rank-major: all first choices, then second, ...
        token = torch.arange(n, device=x.device).repeat(self.k)
        gate = gate.t().reshape(-1)
        if self.capacity_factor is not None:
            cap = math.floor(n * self.capacity_factor * self.k / e)
            order = torch.argsort(expert, stable=True)
            starts = torch.searchsorted(expert[order], torch.arange(e + 1, device=x.device))
            pos = torch.empty_like(order)
            pos[order] = torch.arange(expert.shape[0], device=x.device) - starts[expert[order]]
            expert = torch.where(pos < cap, expert, e)
        return self.mix(x.reshape(n, d), token, expert, gate).view(b, t, d)
'''

EXPERT_CHOICE = '''
class ExpertChoiceMoE(StackedExperts):
    """Expert choice: per group (all tokens, or the batch at one position) each expert takes
    its top C = min(S, ceil(S * factor / E)) tokens by softmax score; gate = score."""

    def __init__(self, d, d_ff, experts, capacity_factor, activation, bias, group):
        super().__init__(d, d_ff, experts, activation, bias, 0)
        self.capacity_factor, self.group = capacity_factor, group

    def forward(self, x, x_norm=None):
        b, t, d = x.shape
        e = self.experts
        sel = (x if x_norm is None else x_norm).reshape(b * t, d)
        probs = softmax_experts(router_logits(sel, self.router.weight))
        scores = probs.unsqueeze(0) if self.group == "batch" else probs.reshape(b, t, e).transpose(0, 1)
        s = scores.shape[1]
        gate, member = scores.topk(min(s, math.ceil(s * self.capacity_factor / e)), dim=1)
        token = member if self.group == "batch" else (
            member * t + torch.arange(t, device=x.device).view(t, 1, 1))
        expert = torch.arange(e, device=x.device).expand_as(token)
        flat = lambda z: z.permute(2, 0, 1).reshape(-1)
        return self.mix(x.reshape(b * t, d), flat(token), flat(expert), flat(gate)).view(b, t, d)
'''

SIGMA = '''
class SigmaMoE(nn.Module):
    """MoEUT's sigma-MoE: top-k experts by selector score, gate = sigmoid(score), no bias."""

    def __init__(self, d, expert_size, experts, k, activation):
        super().__init__()
        g = 2 if is_gated(activation) else 1
        self.k, self.activation = k, activation
        self.keys = nn.Parameter(torch.zeros(experts, d, g * expert_size))
        self.values = nn.Parameter(torch.zeros(experts, expert_size, d))
        self.selector = nn.Parameter(torch.zeros(experts, d))

    def forward(self, x, x_norm=None):
        b, t, d = x.shape
        n = b * t
        logits = router_logits((x if x_norm is None else x_norm).reshape(n, d), self.selector)
        gate, idx = logits.sigmoid().topk(self.k, dim=-1)
        token = torch.arange(n, device=x.device).repeat_interleave(self.k)
        out = expert_mixture(x.reshape(n, d), token, idx.reshape(-1), gate.reshape(-1),
                             self.keys, None, self.values, None, self.activation)
        return out.view(b, t, d)
'''

SWITCHHEAD = '''
class SwitchHeadAttention(nn.Module):
    """MoEUT's SwitchHead: attention whose per-head V and O projections are sigmoid-gated
    top-k mixtures of experts (one dense, O-gated projection when experts == 1); q and k
    scaled by dh^-0.25 each; RoPE on a fraction of each head."""

    def __init__(self, d, heads, head_dim, experts, k, causal, rope, rope_fraction,
                 rope_base):
        super().__init__()
        self.heads, self.head_dim, self.experts, self.k = heads, head_dim, experts, k
        self.causal, self.rope = causal, rope
        self.rope_fraction, self.rope_base = rope_fraction, rope_base
        he = heads * experts
        self.qk = nn.Linear(d, 2 * heads * head_dim, bias=False)
        self.v = nn.Parameter(torch.zeros(he, d, head_dim))
        self.o = nn.Parameter(torch.zeros(he, head_dim, d))
        self.sel_v = nn.Parameter(torch.zeros(he, d)) if experts > 1 else None
        self.sel_o = nn.Parameter(torch.zeros(he, d))

    def select(self, x_sel, weight):
        b_t = x_sel.shape[:-1]
        h, e = self.heads, self.experts
        logits = F.linear(x_sel.float(), weight.float()).view(*b_t, h, e)
        gate, idx = logits.sigmoid().topk(self.k, dim=-1)
        row = idx + torch.arange(h, device=idx.device).view(h, 1) * e
        return row.reshape(-1), gate.reshape(-1)

    def forward(self, x, x_norm=None):
        b, t, d = x.shape
        h, dh, n = self.heads, self.head_dim, b * t
        xq = x if x_norm is None else x_norm
        q, k = self.qk(xq).view(b, t, 2, h, dh).permute(2, 0, 3, 1, 4).unbind(0)
        s = dh ** -0.25
        q, k = q * s, k * s
        if self.rope:
            q = apply_rope(q, self.rope_base, self.rope_fraction)
            k = apply_rope(k, self.rope_base, self.rope_fraction)
        token = torch.arange(n, device=x.device).repeat_interleave(h * self.k)
        head = torch.arange(h, device=x.device).repeat_interleave(self.k).repeat(n)
        if self.experts == 1:
            v = F.linear(x, self.v.permute(0, 2, 1).reshape(h * dh, d))
        else:
            row, gate = self.select(xq, self.sel_v)
            v = expert_mixture(x.reshape(n, d), token, row, gate, self.v,
                               dst=token * h + head, n_out=n * h)
        v = v.view(b, t, h, dh).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, k, v.to(q.dtype), is_causal=self.causal,
                                             scale=1.0).transpose(1, 2)
        if self.experts == 1:
            o_gate = F.linear(xq.float(), self.sel_o.float()).sigmoid()
            att = att * o_gate.unsqueeze(-1).to(att.dtype)
            return F.linear(att.reshape(b, t, h * dh), self.o.reshape(h * dh, d).t())
        row, gate = self.select(xq, self.sel_o)
        out = expert_mixture(att.reshape(n * h, dh), token * h + head, row, gate, self.o,
                             dst=token, n_out=n)
        return out.view(b, t, d)
'''


def _stacked(m: Any) -> dict[str, Any]:
    return {"d": m.d, "d_ff": m.d_ff, "experts": m.experts, "activation": m.activation,
            "bias": m.b1 is not None}


def topk(m: Any) -> Code:
    """Router noise and expert dropout act only in training: not exported."""
    shared = 0 if m.shared is None else m.shared.w_out.in_features
    return Code("TopKMoE", {**_stacked(m), "k": m.k, "capacity_factor": m.capacity_factor,
                            "renormalize": m.renormalize, "shared_d_ff": shared},
                (ACTIVATIONS, DISPATCH, FEED_FORWARD, EXPERTS, TOPK))


def expert_choice(m: Any) -> Code:
    return Code("ExpertChoiceMoE", {**_stacked(m), "capacity_factor": m.capacity_factor,
                                    "group": m.group},
                (ACTIVATIONS, DISPATCH, FEED_FORWARD, EXPERTS, EXPERT_CHOICE))


def sigma_moe(m: Any) -> Code:
    """Expert dropout acts only in training: not exported."""
    return Code("SigmaMoE", {"d": m.d, "expert_size": m.expert_size, "experts": m.experts,
                             "k": m.k, "activation": m.activation},
                (ACTIVATIONS, DISPATCH, SIGMA))


def switchhead(m: Any) -> Code:
    return Code("SwitchHeadAttention", {
        "d": m.d, "heads": m.heads, "head_dim": m.head_dim, "experts": m.experts, "k": m.k,
        "causal": m.causal, "rope": m.rope, "rope_fraction": float(m.rope_fraction),
        "rope_base": float(m.rope_base),
    }, (ACTIVATIONS, ROPE, DISPATCH, SWITCHHEAD))

