"""The flags every `blockdsl` command spells the same way (the CLI convention).

One module so that check, compile, train and search cannot drift apart again: the
positional `SPEC`, `--model`, `--batch`/`--seq`, `--precision` with one default,
`--device`, `--json`, `--quiet` and `--out`. Old spellings (`--batch-size`, `--seq-len`,
`--space`, `--no-live`) stay accepted for one release as hidden aliases: they write the
same destination, are left out of `--help`, and have no default of their own (so the
documented flag's default is the only one).

Imports nothing heavy: `blockdsl check` loads this module and must stay instant.
"""

from __future__ import annotations

import argparse
from typing import Any

from blockdsl.names import PRECISIONS

# Measured (docs/train.md "Precision"; benchmarks/train_precision.py): bf16 autocast with
# fp32 master weights ran the search's baseline block (1 thread) at 1.12x fp32's speed, the
# tiny GPT at 1.16-1.25x, a 10.7M model at 1.82x, and the tiny MoEUT at 0.97x (equal within
# the noise of a shared machine); its losses agree with fp32's to 3-4 digits. fp32-medium
# was slower than fp32 on every small model. One default for every command, so `compile
# --tune` times the kernels `train` and `search` will run.
DEFAULT_PRECISION = "bf16"
PRECISION_HELP = ("bf16 (default: autocast, fp32 weights; measured 0.97-1.8x fp32's speed "
                  "here, see docs/train.md), fp32, or fp32-medium (fp32 with 'medium' matmul "
                  "precision)")

EPILOG = """\
every command follows one convention:
  SPEC               the .block file (search: a file holding a space)
  --model NAME       the model (or space) in the file; default: the file's last
  --batch N, --seq N sequences per step and their length
  --precision P      fp32 | fp32-medium | bf16 (default bf16, on every command)
  --device D         auto (cuda if present; default, search: cpu) | cpu | cuda:1
  --json             the summary as one JSON object on stdout
  --quiet            no live display (progress bar, live table, summary tables)
  --out DIR          output folder; default out/<model> (compile), runs/<model>
                     (train), studies/<study> (search)
exit codes: 0 done, 1 a mistake you can fix (message says where), 2 an internal
error (a bug: please report it), 130 interrupted."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is a usage error: exit 1)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def alias(p: argparse.ArgumentParser, old: str, dest: str, **kw: Any) -> None:
    """`old` spells the flag that writes `dest`, hidden from --help, for one release."""
    p.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


def add_spec(p: argparse.ArgumentParser, what: str = "model") -> None:
    p.add_argument("spec", metavar="SPEC", help=".block file")
    p.add_argument("--model", default=None,
                   help=f"the {what} in the file to use (default: the file's last)")


def add_shape(p: argparse.ArgumentParser, batch_help: str, seq_help: str,
              batch_default: int | None = None, kind: Any = positive_int) -> None:
    """--batch/--seq (and their old spellings); `kind` parses a value (train's own checker
    words its messages like its other numeric flags)."""
    p.add_argument("--batch", type=kind, default=batch_default, metavar="N", help=batch_help)
    p.add_argument("--seq", type=kind, default=None, metavar="N", help=seq_help)
    alias(p, "--batch-size", "batch", type=kind)
    alias(p, "--seq-len", "seq", type=kind)


def add_torch(p: argparse.ArgumentParser, device_default: str | None = "auto",
              device_help: str = "auto (cuda if present), cpu, cuda, cuda:1, ...") -> None:
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help=PRECISION_HELP)
    p.add_argument("--device", default=device_default, help=device_help)


def add_output(p: argparse.ArgumentParser, quiet_help: str, json_help: str | None = None) -> None:
    p.add_argument("--json", action="store_true",
                   help=json_help or "print the summary as one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help=quiet_help)
