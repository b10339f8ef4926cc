"""What every lowered model returns, and what the training loop relies on."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
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


# A pytree node, so `torch.export` and `torch.compile` flatten the output into its logits
# and aux tensors and rebuild a ModelOutput around them (unregistered, export refused the
# model's return value). The serialized name lets `torch.export.save`/`load` round-trip it;
# a loader without blockdsl gets the same two fields from `ep.module()` once it registers a
# dataclass of that name, or calls the exported graph directly.
torch.export.register_dataclass(ModelOutput, serialized_type_name="blockdsl.ModelOutput")
