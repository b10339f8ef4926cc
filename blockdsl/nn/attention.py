"""Multi-head self-attention with grouped-query heads, optional RoPE and MoEUT's peri-norm input.

One fused QKV projection (one matmul instead of three) and one output projection: this
layout is what the torch-free parameter counter assumes, so it must not change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockdsl.names import ATTENTION_IMPLS as IMPLS
from blockdsl.nn.rope import apply_rope


class _BmmAttention(torch.autograd.Function):
    """softmax(Q K^T / sqrt(dh) [+ causal mask]) V as two batched matmuls, hand-written backward.

    Q, K, V: [..., T, dh] with the same leading dims. Everything runs in the inputs' dtype
    (bf16 under autocast: the CPU softmax kernel accumulates in fp32 internally), so no
    [T, T] tensor is ever cast. Against autograd through the reference ops it makes one
    pass over the scores forward besides the matmuls (softmax; scale and mask go into the
    first matmul) and two backward (dS = P * (dP - rowsum(dO * O)), in place); the scale is applied to the
    [T, dh] gradients.
    The probabilities are saved as manual attention saves them. Where this beats SDPA
    (its CPU backward is slow in bf16 at short sequences) is measured per shape by
    `compile --tune`.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        t, s = q.shape[-2], k.shape[-2]
        q3, k3, v3 = (x.reshape(-1, x.shape[-2], x.shape[-1]) for x in (q, k, v))
        scale = 1.0 / math.sqrt(q.shape[-1])
        # Autocast would run softmax in fp32 and cast back; the inputs already carry the dtype.
        with torch.autocast(q.device.type, enabled=False):
            if causal:
                # Query i sees keys j <= i (top-left aligned, as SDPA's is_causal). The mask is
                # added inside the matmul: a broadcast masked_fill_ over [B*n, T, T] measured
                # 3x the cost of the matmul itself here.
                bias = torch.zeros(t, s, dtype=q.dtype, device=q.device)
                bias.masked_fill_(torch.ones(t, s, dtype=torch.bool, device=q.device).triu_(1),
                                  float("-inf"))
                scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=scale)
            else:
                scores = torch.bmm(q3 * scale, k3.transpose(1, 2))
            probs = torch.softmax(scores, dim=-1)
            out = torch.bmm(probs, v3)
        ctx.save_for_backward(q3, k3, v3, probs, out)
        ctx.scale, ctx.shapes = scale, (q.shape, k.shape, v.shape)
        return out.reshape(*q.shape[:-1], v.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q3, k3, v3, probs, out = ctx.saved_tensors
        go = grad_out.reshape(out.shape).to(out.dtype)
        grad_v = torch.bmm(probs.transpose(1, 2), go)
        dp = torch.bmm(go, v3.transpose(1, 2))
        row = (go.float() * out.float()).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
        # In the input dtype, in place: dP is already rounded to it by the matmul, and mixed-
        # dtype elementwise ops over [T, T] cost a cast copy per operand (measured 3x slower).
        ds = dp.sub_(row.to(dp.dtype)).mul_(probs)
        grad_q = torch.bmm(ds, k3).mul_(ctx.scale)
        grad_k = torch.bmm(ds.transpose(1, 2), q3).mul_(ctx.scale)
        qs, ks, vs = ctx.shapes
        return grad_q.reshape(qs), grad_k.reshape(ks), grad_v.reshape(vs), None


class MultiHeadAttention(nn.Module):
    """Self-attention over x [B, T, d].

    Parameters: qkv (d x (heads + 2 kv_heads) head_dim [+ bias]) and out
    (heads head_dim x d [+ bias]). `kv_heads` < `heads` is grouped-query attention: query
    head h reads key/value head h // (heads // kv_heads). `impl` is a plain attribute so the
    lowering can switch kernels after measuring; both give the same function.
    """

    def __init__(
        self,
        d: int,
        heads: int,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        causal: bool = False,
        rope: bool = False,
        rope_base: float = 10000.0,
        rope_fraction: float = 1.0,
        impl: str = "sdpa",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if heads <= 0 or kv_heads <= 0:
            raise ValueError(f"heads ({heads}) and kv_heads ({kv_heads}) must be positive")
        if heads % kv_heads:
            raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
        if head_dim is None:
            if d % heads:
                raise ValueError(f"d={d} is not divisible by heads={heads}; give head_dim")
            head_dim = d // heads
        if impl not in IMPLS:
            raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
        self.d, self.heads, self.kv_heads, self.head_dim = d, heads, kv_heads, head_dim
        self.causal = causal
        self.rope, self.rope_base, self.rope_fraction = rope, rope_base, rope_fraction
        self.impl = impl
        self.dropout = dropout
        self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * head_dim, bias=bias)
        self.out = nn.Linear(heads * head_dim, d, bias=bias)

    def _project(self, x: Tensor, x_norm: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K, V as [B, T, n, dh]; with `x_norm`, Q and K read x_norm and V reads x.

        MoEUT's peri-norm normalises only what feeds the attention scores; slicing the
        fused weight keeps one parameter tensor for both paths.
        """
        q_dim = self.heads * self.head_dim
        kv_dim = self.kv_heads * self.head_dim
        if x_norm is None:
            q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        else:
            w, b = self.qkv.weight, self.qkv.bias
            qk_dim = q_dim + kv_dim
            qk = F.linear(x_norm, w[:qk_dim], None if b is None else b[:qk_dim])
            v = F.linear(x, w[qk_dim:], None if b is None else b[qk_dim:])
            q, k = qk.split([q_dim, kv_dim], dim=-1)
        shape = x.shape[:-1]
        return (
            q.reshape(*shape, self.heads, self.head_dim),
            k.reshape(*shape, self.kv_heads, self.head_dim),
            v.reshape(*shape, self.kv_heads, self.head_dim),
        )

    def forward(self, x: Tensor, x_norm: Tensor | None = None) -> Tensor:
        q, k, v = (t.transpose(1, 2) for t in self._project(x, x_norm))  # [B, n, T, dh]
        if self.rope:
            q = apply_rope(q, self.rope_base, self.rope_fraction)
            k = apply_rope(k, self.rope_base, self.rope_fraction)
        p = self.dropout if self.training else 0.0
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=p,
                is_causal=self.causal,
                enable_gqa=self.kv_heads != self.heads,
            )
        elif self.impl == "manual" or (self.impl == "bmm" and p > 0):
            y = self._manual(q, k, v, p)  # bmm has no dropout: it falls back to the reference
        elif self.impl == "bmm":
            groups = self.heads // self.kv_heads
            if groups > 1:
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            y = _BmmAttention.apply(q, k, v, self.causal)
        else:
            raise ValueError(f"unknown attention impl {self.impl!r}; expected one of {IMPLS}")
        y = y.transpose(1, 2).reshape(*x.shape[:-1], self.heads * self.head_dim)
        return F.dropout(self.out(y), p, self.training)

    def _manual(self, q: Tensor, k: Tensor, v: Tensor, p: float) -> Tensor:
        """Explicit softmax(QK^T / sqrt(dh)) V with an fp32 softmax: the reference path."""
        groups = self.heads // self.kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-2, -1)).float() / math.sqrt(self.head_dim)
        if self.causal:
            t, s = scores.shape[-2:]
            keep = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        probs = F.dropout(scores.softmax(dim=-1), p, self.training).to(v.dtype)
        return torch.matmul(probs, v)
