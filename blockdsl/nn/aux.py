"""Auxiliary losses: one collector per forward pass, filled by the primitives that route.

Why a collector instead of return values: a primitive may be applied many times
(sharing, MoEUT groups, AltUp), sit deep inside wrappers, and some regularisers (MoEUT's
entropy) need statistics pooled over *all applications* of one module before the loss can
be formed. The model opens one `AuxLosses` around its forward; primitives call `record` /
`record_marginal_entropy`; outside a collector those calls are no-ops, so every primitive
also works standalone. The model returns the finalized values in its output
(`ModelOutput.aux`), so they leave the forward as ordinary graph outputs.

Why a plain module-level stack rather than a `ContextVar`: TorchDynamo cannot trace a
ContextVar (`torch.compile(fullgraph=True)` stopped there), while a list it can: it traces
the push, the records and the pop as side effects of the graph, so compiled, exported and
eager forwards collect the same values. What is given up is per-thread isolation: two
threads running forwards at the same moment in one process would share the stack.
blockdsl never does that (data loading runs in processes; its threads only watch
liveness and print progress); run models in separate processes to train concurrently.

Interface used by the training loop (documented in the README):
    out = model(x)            # out.aux: dict[kind, weighted scalar tensor]
    loss = task_loss + sum(out.aux.values())
Values are already multiplied by their configured weights; a kind whose weight is 0 is
never recorded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator

import torch
from torch import Tensor

# The open collectors, innermost last (see the module docstring for why not a ContextVar).
_STACK: list[AuxLosses] = []


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
        slot = self._marginals.setdefault((kind, pool_key(key)), (weight, []))
        slot[1].append(log_probs)

    def finalize(self) -> dict[str, Tensor]:
        out = dict(self._values)
        for (kind, _key), (weight, parts) in self._marginals.items():
            lp = torch.cat(parts, dim=1).float()  # [B, N_total, *groups, E]
            n = lp.shape[1]
            # log n as a tensor op, not math.log: under a dynamic-length trace n is a
            # symbol, and a Python float from it would pin the length to one value
            log_n = lp.new_ones(()).mul(n).log()
            marg = torch.logsumexp(lp, dim=1) - log_n  # [B, *groups, E]
            entropy = -(marg.exp() * marg).sum(-1).mean()
            term = -weight * entropy
            out[kind] = out[kind] + term if kind in out else term
        return out


def pool_key(key: Hashable) -> Hashable:
    """The identity under which a module's applications pool: its `aux_pool_key` if it has
    one (a tuple's members mapped the same way), else the key itself.

    Why not the module object alone: `torch.export` (non-strict, torch 2.13) hands each
    application of a shared module to the forward as a different object, so pooling by
    object identity counted every application apart (measured: the exported tiny MoEUT's
    entropy terms came out doubled). `assign_pool_keys` gives every submodule of a model a
    plain attribute, which those objects carry along.
    """
    if isinstance(key, tuple):
        return tuple(pool_key(k) for k in key)
    return getattr(key, "aux_pool_key", key)


def assign_pool_keys(model: object) -> None:
    """Give each submodule of `model` (an nn.Module) a key unique within this process."""
    for i, mod in enumerate(model.modules()):  # type: ignore[attr-defined]
        mod.aux_pool_key = (id(model), i)


def current() -> AuxLosses | None:
    return _STACK[-1] if _STACK else None


def record(kind: str, value: Tensor) -> None:
    """Record a weighted scalar loss if a collector is open; otherwise do nothing."""
    if _STACK:
        _STACK[-1].add(kind, value)


def record_marginal_entropy(kind: str, key: Hashable, log_probs: Tensor, weight: float) -> None:
    if _STACK and weight != 0.0:
        _STACK[-1].add_marginal_entropy(kind, key, log_probs, weight)


@contextlib.contextmanager
def collect() -> Iterator[AuxLosses]:
    """Open a collector for one forward pass (nested collectors shadow the outer one)."""
    col = AuxLosses()
    _STACK.append(col)
    try:
        yield col
    finally:
        _STACK.pop()
