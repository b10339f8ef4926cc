"""AltUp: Alternating Updates (Baykal et al., NeurIPS 2023), around a stack of residual layers.

The residual stream is widened to K blocks of width d while every layer keeps width d.
Per wrapped layer i, with active block j*:

    predict   x̂_k = Σ_j p[i, k, j] x_j                  (K² learned scalars)
    compute   x̃   = layer_i(x̂_j*)                       (the only full-cost step)
    correct   x_k ← x̂_k + g[i, k] (x̃ − x̂_j*)            (K learned scalars)

Entering and leaving the widened stream (`widen` / `narrow`):

- "recycled" (Recycled-AltUp): the d-wide embedding is replicated K times on the way in
  and the K blocks are summed on the way out. Zero extra parameters anywhere. The sum is
  K times the scale of one block; the final norm before the head absorbs it.
- "wide" (AltUp proper): the stem embeds into K·d and that vector is split into the K
  blocks. Reading implemented: on the way out the K blocks are concatenated back to K·d,
  *not* reduced, so the final norm and the output layer are K·d wide. Why: the paper
  widens the learned representation, "i.e., the token embedding", and the sources
  available here describe a reduction (the block-sum) only for Recycled-AltUp, as the
  device that keeps its representation d-wide at the output; nothing narrows the widened
  stream in AltUp proper. (Unverified against the full paper text, which was not
  available; see REFERENCE.md.) AltUp adds no parameters in this mode either: the extra
  ones, (K−1)·vocab·d in the embedding, (K−1)·vocab·d in an untied output layer and
  (K−1)·d per weight vector of the final norm (2(K−1)·d for LayerNorm with bias), are
  owned and counted by the stem and head, which the lowering builds at width K·d.

Sequence-AltUp (the same predict/correct idea along the sequence: a layer runs on a
strided subset of tokens, the skipped ones are predicted and corrected) is deliberately
not implemented: the sources available here (abstract, blog post, secondary summaries)
do not give its equations (how skipped tokens are predicted, how the strided outputs are
aligned under causal masking, which coefficients are shared), so any version would be a
guess presented as the paper's method.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

SELECTIONS = ("alternating", "same")
MODES = ("recycled", "wide")


def widen(x: Tensor, K: int, mode: str = "recycled") -> Tensor:
    """Stem output to the AltUp stream [K, B, T, d]: replicate [B, T, d] or split [B, T, K·d]."""
    if mode == "recycled":
        return x.unsqueeze(0).expand(K, *x.shape)
    if mode == "wide":
        if x.shape[-1] % K:
            raise ValueError(f"widened embedding of width {x.shape[-1]} is not K={K} blocks")
        return x.unflatten(-1, (K, x.shape[-1] // K)).movedim(-2, 0)
    raise ValueError(f"unknown AltUp mode {mode!r}; expected one of {MODES}")


def narrow(xs: Tensor, mode: str = "recycled") -> Tensor:
    """AltUp stream [K, B, T, d] to the head: sum to [B, T, d] or concatenate to [B, T, K·d]."""
    if mode == "recycled":
        return xs.sum(dim=0)
    if mode == "wide":
        return xs.movedim(0, -2).flatten(-2)
    raise ValueError(f"unknown AltUp mode {mode!r}; expected one of {MODES}")


class AltUp(nn.Module):
    """Wraps residual layers (x -> x + f(x), any callable [B, T, d] -> [B, T, d]).

    Params: K² + K per wrapped layer *position* (`predict` [L, K, K], `correct` [L, K]),
    plus the wrapped layers' own, counted once however often a module recurs. Init is
    predict = I and correct = 1, so with K = 1 the wrapper is exactly the bare stack.
    """

    def __init__(self, layers: Sequence[nn.Module], K: int, selection: str = "alternating") -> None:
        super().__init__()
        if K < 1:
            raise ValueError(f"AltUp needs K >= 1 blocks, got K={K}")
        if selection not in SELECTIONS:
            raise ValueError(f"unknown AltUp selection {selection!r}; expected {SELECTIONS}")
        if not layers:
            raise ValueError("AltUp needs at least one layer to wrap")
        self.K = K
        self.selection = selection
        self.layers = nn.ModuleList(layers)  # a module listed twice is stored once
        n = len(self.layers)
        self.predict = nn.Parameter(torch.eye(K).repeat(n, 1, 1))
        self.correct = nn.Parameter(torch.ones(n, K))

    def active_block(self, i: int) -> int:
        """Block j* computed by layer position i: i mod K (alternating) or always 0."""
        return i % self.K if self.selection == "alternating" else 0

    def forward(self, xs: Tensor) -> Tensor:
        if xs.shape[0] != self.K:
            raise ValueError(f"AltUp expects {self.K} blocks on dim 0, got {xs.shape[0]}")
        K = self.K
        for i, layer in enumerate(self.layers):
            j = self.active_block(i)
            p = self.predict[i].to(xs.dtype)
            g = self.correct[i].to(xs.dtype)
            x_hat = (p @ xs.reshape(K, -1)).reshape(xs.shape)
            x_tilde = layer(x_hat[j])
            delta = x_tilde - x_hat[j]
            # The active block is written as x̃ + (g−1)·δ, algebraically x̂ + g·δ, so that
            # g = 1 yields x̃ bit-for-bit (x̂ + (x̃ − x̂) would round).
            xs = torch.stack(
                [
                    x_tilde + (g[k] - 1) * delta if k == j else x_hat[k] + g[k] * delta
                    for k in range(K)
                ]
            )
        return xs

    def widen(self, x: Tensor, mode: str = "recycled") -> Tensor:
        """See module `widen`; bound to this wrapper's K."""
        return widen(x, self.K, mode)

    def narrow(self, xs: Tensor, mode: str = "recycled") -> Tensor:
        """See module `narrow`."""
        return narrow(xs, mode)
