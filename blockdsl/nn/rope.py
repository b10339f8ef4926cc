"""Rotary position embedding (Su et al., 2021) in GPT-NeoX half-split layout.

Half-split (pairs (i, i + r/2)) rather than interleaved pairs because it is two slices and
a concatenation instead of a strided view, and because partial rotary (`fraction` < 1, as
in GPT-NeoX and Pythia) rotates a contiguous prefix of each head.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_dims(head_dim: int, fraction: float = 1.0) -> int:
    """Number of rotated dims per head: even, so every rotated dim has a partner."""
    return int(head_dim * fraction) // 2 * 2


def _cos_sin(
    offset: int, length: int, r: int, base: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    """fp32 cos/sin tables [length, r/2] for positions offset .. offset + length - 1.

    Why computed in every forward rather than cached: a module-level cache keyed by
    (length, device) leaked tensors between tracings (an eager forward's table became a
    constant of a later `torch.export`, an exported fake tensor a cached one), and a
    symbolic sequence length cannot be a dict key, so a dynamic-length export failed. The
    tables are `length x r/2` cos and sin of one outer product (about 2 x 64K elements at
    T = 2048, r = 64), small beside the attention they feed, and built from the input's
    own shape, so eager, `torch.compile` and `torch.export` (dynamic T) run the same code.
    Built in fp32 whatever the autocast or parameter dtype, as before.
    """
    exponent = torch.arange(0, r, 2, device=device, dtype=torch.float32) / r
    inv_freq = 1.0 / (base**exponent)
    pos = torch.arange(length, device=device, dtype=torch.float32) + offset
    angles = torch.outer(pos, inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, base: float = 10000.0, fraction: float = 1.0, offset: int = 0) -> Tensor:
    """Rotate the first `rotary_dims(dh, fraction)` dims of each head of x [B, H, T, dh].

    `offset` is the absolute position of x[..., 0, :] (for cached decoding). The rotation
    is done in fp32 so low-precision inputs keep the relative-position property; the
    result has x's dtype.
    """
    dh = x.shape[-1]
    r = rotary_dims(dh, fraction)
    if r == 0:
        return x
    half = r // 2
    t = x.shape[-2]
    cos, sin = _cos_sin(offset, t, r, base, x.device)
    rot = x[..., :r].float()
    x1, x2 = rot[..., :half], rot[..., half:]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    if r == dh:
        return rotated
    return torch.cat((rotated, x[..., r:]), dim=-1)
