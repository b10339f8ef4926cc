"""`--format hf`: a folder `transformers` loads with `trust_remote_code=True`.

config.json (model_type "blockdsl", the model as data under "blockdsl", an `auto_map`
naming the classes), modeling_blockdsl.py (the standalone code of `--format pytorch`
plus thin `PreTrainedModel` wrappers: `BlockdslForCausalLM` with `generate()` for a
language model, `BlockdslForImageClassification` for a classifier), model.safetensors.

Why every name of a shared tensor is written (a shared layer's weights once per layer
that uses it), unlike the other formats' model.safetensors: `from_pretrained` fills a
model parameter by parameter, by name, and a name missing from the file counts as
missing weights to initialise. The generated model shares *modules*, so the copies land
in one module again and sharing survives the load; the file is larger by the repeats.

`transformers` is an optional extra (`pip install 'blockdsl[hf]'`): imported only by the
generated file, never by blockdsl, which only writes text here.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from blockdsl.export.pytorch import model_config, model_source

WRAPPERS = '''

# --------------------------------------------------------------- Hugging Face wrappers
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput, ImageClassifierOutput


class BlockdslConfig(PretrainedConfig):
    """The model as data (`blockdsl`: what CONFIG above holds) plus transformers' fields."""

    model_type = "blockdsl"

    def __init__(self, blockdsl=None, **kwargs):
        self.blockdsl = blockdsl if blockdsl is not None else CONFIG
        super().__init__(**kwargs)


class _Base(PreTrainedModel):
    config_class = BlockdslConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config):
        super().__init__(config)
        self.model = Model(config.blockdsl)
        self.post_init()

    def _init_weights(self, module):
        """Weights come from the checkpoint; nothing is initialised here."""


class BlockdslForCausalLM(_Base, GenerationMixin):
    """Next-token logits; `generate()` re-reads the whole window each step (no KV cache)."""

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        context = self.config.blockdsl.get("context")
        logits = self.model(input_ids if context is None else input_ids[:, -context:])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}


class BlockdslForImageClassification(_Base):
    main_input_name = "pixel_values"

    def forward(self, pixel_values, labels=None, **kwargs):
        logits = self.model(pixel_values)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return ImageClassifierOutput(loss=loss, logits=logits)
'''


def write(model: nn.Module, out: Path) -> list[Path]:
    """Write config.json, modeling_blockdsl.py and model.safetensors into `out`."""
    from safetensors.torch import save_file

    from blockdsl.export.weights import save_weights
    from blockdsl.runs import resolved_spec, weights_metadata

    lm = model.io.task == "lm"
    cls = "BlockdslForCausalLM" if lm else "BlockdslForImageClassification"
    auto = "AutoModelForCausalLM" if lm else "AutoModelForImageClassification"
    src = model_source(model) + WRAPPERS
    compile(src, "modeling_blockdsl.py", "exec")
    (out / "modeling_blockdsl.py").write_text(src)
    config = {
        "model_type": "blockdsl", "architectures": [cls],
        "auto_map": {"AutoConfig": "modeling_blockdsl.BlockdslConfig",
                     auto: f"modeling_blockdsl.{cls}"},
        "blockdsl": model_config(model),
    }
    if lm:
        # use_cache false: the model re-reads its window each step (no KV cache to build)
        config.update(vocab_size=model.io.vocab, eos_token_id=None, pad_token_id=None,
                      use_cache=False)
    else:
        config.update(num_labels=model.io.classes)
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    save_weights(model, out)  # resolved.block (and the deduplicated file, replaced below)
    # every name, each its own copy, with the "model." prefix of the wrapper
    tensors = {f"model.{k}": v.detach().clone().contiguous()
               for k, v in model.state_dict().items()}
    path = out / "model.safetensors"
    save_file(tensors, str(path), metadata=weights_metadata(resolved_spec(model)))
    return [out / "config.json", out / "modeling_blockdsl.py", path]
