"""Auxiliary losses: one collector per forward pass, filled by the primitives that route.

Why a context collector instead of return values: a primitive may be applied many times
(sharing, MoEUT groups, AltUp), sit deep inside wrappers, and some regularisers (MoEUT's
entropy) need statistics pooled over *all applications* of one module before the loss can
be formed. The model opens one `AuxLosses` around its forward; primitives call `record` /
`record_marginal_entropy`; outside a collector those calls are no-ops, so every primitive
also works standalone.

Interface used by the training loop (documented in the README):
    out = model(x)            # out.aux: dict[kind, weighted scalar tensor]
    loss = task_loss + sum(out.aux.values())
Values are already multiplied by their configured weights; a kind whose weight is 0 is
never recorded.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Hashable, Iterator

import torch
from torch import Tensor

_current: contextvars.ContextVar[AuxLosses | None] = contextvars.ContextVar(
    "blockdsl_aux", default=None
)


class AuxLosses:
    """Weighted auxiliary losses of one forward pass, summed per kind."""

    def __init__(self) -> None:
        self._values: dict[str, Tensor] = {}
        # (kind, key) -> (weight, list of log-prob tensors [B, N, *groups, E])
        self._marginals: dict[tuple[str, Hashable], tuple[float, list[Tensor]]] = {}

    def add(self, kind: str, value: Tensor) -> None:
        """Add an already-weighted scalar loss under `kind` (summed over calls)."""
        prev = self._values.get(kind)
        self._values[kind] = value if prev is None else prev + value

    def add_marginal_entropy(
        self, kind: str, key: Hashable, log_probs: Tensor, weight: float
    ) -> None:
        """Pool router log-probabilities [B, N, *groups, E] for an entropy bonus.

        All calls with the same (kind, key) — e.g. every application of one shared
        layer — are pooled: the per-sequence marginal over N and over the calls is
        formed, its entropy H over E computed, averaged over batch and groups, and
        `-weight * H` is added under `kind` at `finalize()`.
        """
        slot = self._marginals.setdefault((kind, key), (weight, []))
        slot[1].append(log_probs)

    def finalize(self) -> dict[str, Tensor]:
        out = dict(self._values)
        for (kind, _key), (weight, parts) in self._marginals.items():
            lp = torch.cat(parts, dim=1).float()  # [B, N_total, *groups, E]
            n = lp.shape[1]
            marg = torch.logsumexp(lp, dim=1) - math.log(n)  # [B, *groups, E]
            entropy = -(marg.exp() * marg).sum(-1).mean()
            term = -weight * entropy
            out[kind] = out[kind] + term if kind in out else term
        return out


def current() -> AuxLosses | None:
    return _current.get()


def record(kind: str, value: Tensor) -> None:
    """Record a weighted scalar loss if a collector is open; otherwise do nothing."""
    col = _current.get()
    if col is not None:
        col.add(kind, value)


def record_marginal_entropy(kind: str, key: Hashable, log_probs: Tensor, weight: float) -> None:
    col = _current.get()
    if col is not None and weight != 0.0:
        col.add_marginal_entropy(kind, key, log_probs, weight)


@contextlib.contextmanager
def collect() -> Iterator[AuxLosses]:
    """Open a collector for one forward pass (nested collectors shadow the outer one)."""
    col = AuxLosses()
    token = _current.set(col)
    try:
        yield col
    finally:
        _current.reset(token)
