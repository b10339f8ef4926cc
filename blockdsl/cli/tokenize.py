"""`blockdsl tokenize TEXT...`: text files to token ids that `train --data DIR` reads.

Thin: the work is `blockdsl.train.tokdata.tokenize`; this maps flags and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _vocab(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer vocabulary size, got {text!r}") from None
    if v < 256:
        raise argparse.ArgumentTypeError(
            f"expected a vocabulary of at least 256 (a byte-level BPE holds every byte), got {v}")
    return v


def register(subparsers: Any) -> None:
    """Add the `tokenize` subcommand to the main parser."""
    p = subparsers.add_parser(
        "tokenize",
        help="turn text files into token ids (train.bin/val.bin + meta.json) for train --data",
        description=(
            "Tokenize text files (or every text file under a folder) with a Hugging Face "
            "tokenizer.json, or with a byte-level BPE trained here, offline, on the training "
            "part of the text. Writes DIR/train.bin and DIR/val.bin (the last 10% of the "
            "text, from a line start), DIR/meta.json (dtype, vocab_size, bytes per token) and "
            "DIR/tokenizer.json; then `blockdsl train SPEC --data DIR`. Needs "
            "pip install 'blockdsl[tokenizers]'."
        ),
    )
    p.add_argument("text", nargs="+", metavar="TEXT", help="text files or folders")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--tokenizer", type=Path, metavar="FILE",
                     help="a tokenizers tokenizer.json (copied into DIR)")
    how.add_argument("--train-bpe", type=_vocab, metavar="VOCAB",
                     help="train a byte-level BPE with this vocabulary on the text")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output folder (default data/<name of the first TEXT>)")
    p.add_argument("--force", action="store_true", help="replace a corpus already in DIR")
    p.add_argument("--json", action="store_true", help="print meta.json's content as JSON")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from blockdsl.train.data import DataError
    from blockdsl.train.tokdata import tokenize

    out = args.out or Path("data") / (Path(args.text[0]).expanduser().resolve().stem or "text")
    try:
        meta = tokenize(args.text, out, tokenizer=args.tokenizer, bpe_vocab=args.train_bpe,
                        force=args.force)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. an unwritable --out
        print(f"error: {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"out": str(out), **meta}))
    elif not args.quiet:
        how = "trained byte-level BPE" if meta["trained_bpe"] else "tokenizer"
        print(f"{out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
              f"({meta['dtype']}, vocab {meta['vocab_size']:,}, {how}, "
              f"{meta['bytes_per_token']:.3f} bytes/token) from {meta['files']} file(s)")
        print(f"next: blockdsl train SPEC --data {out}   (the spec needs "
              f"stem tokens(vocab={meta['vocab_size']}))")
    return 0
