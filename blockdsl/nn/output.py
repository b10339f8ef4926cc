"""What every lowered model returns, and what the training loop relies on."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class ModelOutput:
    """`logits`: [B, T, vocab] for language models, [B, classes] for classifiers.

    `aux`: weighted auxiliary losses of this forward pass by kind ("balance", "z",
    "entropy_ffn", "entropy_attn", ...). The training objective is
    `task_loss + sum(aux.values())`; each kind is logged separately.
    """

    logits: Tensor
    aux: dict[str, Tensor] = field(default_factory=dict)

    def aux_total(self) -> Tensor | float:
        return sum(self.aux.values(), 0.0)
