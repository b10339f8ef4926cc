"""Standalone source of the attention primitives (`mha`) and RoPE."""

from __future__ import annotations

from typing import Any

from blockdsl.export.codegen import Code

# blockdsl.nn.rope: GPT-NeoX half-split layout, tables in fp32 built per forward.
ROPE = '''
def apply_rope(x, base, fraction):
    """Rotate the first (even) fraction of each head's dims of x [B, H, T, dh]."""
    dh = x.shape[-1]
    r = int(dh * fraction) // 2 * 2
    if r == 0:
        return x
    half, t = r // 2, x.shape[-2]
    inv_freq = 1.0 / (base ** (torch.arange(0, r, 2, device=x.device, dtype=torch.float32) / r))
    angles = torch.outer(torch.arange(t, device=x.device, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    rot = x[..., :r].float()
    x1, x2 = rot[..., :half], rot[..., half:]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return rotated if r == dh else torch.cat((rotated, x[..., r:]), dim=-1)
'''

MHA = '''
class MultiHeadAttention(nn.Module):
    """Self-attention with a fused qkv projection, grouped-query heads and optional RoPE.

    With x_norm (peri-norm), Q and K read x_norm and V reads x. `manual` is the explicit
    fp32 softmax(QK^T / sqrt(dh)) V; otherwise torch's scaled_dot_product_attention.
    """

    def __init__(self, d, heads, kv_heads, head_dim, bias, causal, rope, rope_base,
                 rope_fraction, manual):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.causal, self.rope, self.manual = causal, rope, manual
        self.rope_base, self.rope_fraction = rope_base, rope_fraction
        self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * head_dim, bias=bias)
        self.out = nn.Linear(heads * head_dim, d, bias=bias)

    def forward(self, x, x_norm=None):
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if x_norm is None:
            q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        else:
            w, b = self.qkv.weight, self.qkv.bias
            n = q_dim + kv_dim
            qk = F.linear(x_norm, w[:n], None if b is None else b[:n])
            v = F.linear(x, w[n:], None if b is None else b[n:])
            q, k = qk.split([q_dim, kv_dim], dim=-1)
        shape = x.shape[:-1]
        q = q.reshape(*shape, self.heads, self.head_dim).transpose(1, 2)
        k = k.reshape(*shape, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(*shape, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rope:
            q = apply_rope(q, self.rope_base, self.rope_fraction)
            k = apply_rope(k, self.rope_base, self.rope_fraction)
        if self.manual:
            groups = self.heads // self.kv_heads
            if groups > 1:
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            scores = torch.matmul(q, k.transpose(-2, -1)).float() / math.sqrt(self.head_dim)
            if self.causal:
                t, s = scores.shape[-2:]
                keep = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril()
                scores = scores.masked_fill(~keep, float("-inf"))
            y = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                               enable_gqa=self.kv_heads != self.heads)
        return self.out(y.transpose(1, 2).reshape(*shape, q_dim))
'''


def mha(m: Any) -> Code:
    """blockdsl's "bmm" kernel computes the manual path's function (its own backward is
    what differs), so it exports as `manual`; "sdpa" as torch's kernel."""
    return Code("MultiHeadAttention", {
        "d": m.d, "heads": m.heads, "kv_heads": m.kv_heads, "head_dim": m.head_dim,
        "bias": m.qkv.bias is not None, "causal": m.causal, "rope": m.rope,
        "rope_base": float(m.rope_base), "rope_fraction": float(m.rope_fraction),
        "manual": m.impl != "sdpa",
    }, (ROPE, MHA))
