"""Models leave blockdsl: `blockdsl export SPEC_OR_RUN --format {pytorch,hf,pt2} --out DIR`.

- `pytorch` (`pytorch.py`): one standalone `model.py` importing only torch, generated per
  primitive from the registry (`codegen/`), and model.safetensors.
- `hf` (`hf.py`): a Hugging Face folder around the same generated code, for
  `AutoModelForCausalLM` / `AutoModelForImageClassification` with `trust_remote_code`.
- `pt2` (`program.py`): `torch.export.save` of the exported program (dynamic batch and
  sequence length).

Every format writes model.safetensors with the spec and blockdsl's version in its
metadata, and resolved.block; a pytorch or pt2 export folder is itself one
`blockdsl.load_run` rebuilds (an hf folder's weight names carry the wrapper's "model."
prefix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FORMATS = ("pytorch", "hf", "pt2")


class ExportError(ValueError):
    """A model a format cannot express; the message names the part and the way out."""


def load_source(source: str | Path, device: Any = "cpu", seed: int = 0) -> Any:
    """A run or checkpoint folder (its trained weights), or a spec (fresh weights drawn with
    `seed`, for trying an export before training)."""
    import torch

    from blockdsl import build, load_run

    p = Path(source)
    if p.is_dir():
        return load_run(p, device=device)
    torch.manual_seed(seed)
    return build(p, device=device).eval()


def export(model: Any, fmt: str, out: str | Path) -> list[Path]:
    """Write `model` (a lowered BlockModel) in format `fmt` into folder `out`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "pt2":
        from blockdsl.export import program

        return program.write(model, out)
    if fmt == "hf":
        from blockdsl.export import hf

        return hf.write(model, out)
    from blockdsl.export import pytorch

    return pytorch.write(model, out)
