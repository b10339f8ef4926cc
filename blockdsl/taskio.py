"""What a built model takes in and puts out: its task shape, one typed record.

Why a record rather than attributes: lowering used to set loose attributes on the module
(`seq_len`, `vocab_size`, `image_size`, ...), each only for one task, and training read
them back with `getattr`, so a misspelt or missing one surfaced as an AttributeError deep
in a run. `BlockModel.io` is built once from the Plan, frozen, and every reader names a
field a type checker can see. Torch-free: the CLI builds one from a Plan to check data
before any model exists.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskIO:
    """task "lm": token ids [B, seq] of `vocab` in, next-token logits out;
    task "classify": images [B, channels, image_size, image_size] in, `classes` logits out.

    `seq` is the tokens per example the blocks see (an LM's training context; for a
    classifier, its patches plus the class token); `width` is the embedding/head width
    (K·d under wide AltUp); `patch` a classifier's patch side; `name` the spec's model
    name. Fields a task does not have are None. `Plan.io` builds it; it imports nothing,
    so `nn` (which must not import the language or the Plan) can hold one.
    """

    task: str
    # both tasks
    seq: int | None = None
    width: int | None = None
    name: str = ""
    # a language model
    vocab: int | None = None
    # a classifier
    image_size: int | None = None
    patch: int | None = None
    channels: int | None = None
    classes: int | None = None


def io_of(model: object) -> TaskIO:
    """A model's task shape: a TaskIO itself, or a model's `.io`; for a model without one (a
    module not built by blockdsl), a TaskIO holding only its `.task`, or None as the task
    when it has neither, so that the data check names what is missing instead of failing
    on an attribute."""
    if isinstance(model, TaskIO):
        return model
    io = getattr(model, "io", None)
    return io if isinstance(io, TaskIO) else TaskIO(getattr(model, "task", None))  # type: ignore[arg-type]


def missing(io: TaskIO, *fields: str) -> str | None:
    """The first of `fields` the task shape lacks (None when it has them all)."""
    return next((f for f in fields if getattr(io, f) is None), None)
