"""The training loop: one library function, `train`, that the CLI and the search both call.

Design choices, each for a reason:
- The batch of optimizer step s is a pure function of (seed, s) and is the *global* batch;
  ranks and accumulation micro-steps slice it. So a resumed run, a 2-process run and a
  run with gradient accumulation all see the same examples as the straight single run,
  and `batch_size` means the same thing whatever the memory knobs.
- Gradients are averaged across ranks with one flat all-reduce per step instead of
  wrapping in DistributedDataParallel: routed models (MoE, expert choice) can leave a
  parameter unused in a step, which DDP's reducer only tolerates with an extra graph walk
  every step, and `ModelOutput` needs no special handling.
- The learning-rate schedule is a function of progress in [0, 1], the larger of
  step/total-steps and train-seconds/budget-seconds, so a wall-clock budget (fixed-time
  trials, where faster models take more steps) still ends its cosine at the budget.
  Budget seconds count training steps only, not evaluation or checkpoint writing.
- Weight decay applies to every parameter with ndim >= 2, embeddings included: they are
  matrices, and a tied embedding is also the output projection (as in nanoGPT). Norm
  gains and biases are not decayed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockdsl import files as fileio
from blockdsl.train import data as data_mod
from blockdsl.train.data import DataError, TaskData

PRECISIONS = ("fp32", "fp32-medium", "bf16")
CKPT_PREFIX = "ckpt-"
LATEST = "latest"
_CKPT_NAME = re.compile(re.escape(CKPT_PREFIX) + r"(\d+)")

EvalCallback = Callable[[int, dict[str, float]], "bool | None"]
"""`on_eval(step, metrics) -> bool | None`: called on rank 0 after each evaluation.

`metrics` holds `val_loss` (and `val_bpb` for byte-level text, `val_acc` for classifiers),
plus `train_loss`, `tokens`, `train_seconds`. Return True to stop training after this
step; an exception (e.g. optuna.TrialPruned) stops training on every rank and is re-raised.
"""


class TrainError(Exception):
    """A problem the user can fix (data, spec/data mismatch, output folder, checkpoint)."""

    @property
    def cli_message(self) -> str:
        """The one line the CLI prints instead of a traceback."""
        return str(self)


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model. Budgets: the first one hit stops."""

    data: str | Path | None = None  # file/folder; None = default corpus or digits
    steps: int | None = None
    tokens: int | None = None  # tokens for LMs, images for classifiers
    seconds: float | None = None  # training time, excluding evaluation and checkpoints
    batch_size: int = 16  # global sequences/images per optimizer step
    seq_len: int | None = None  # None = the model's seq_len; may only be shorter
    accum: int = 1  # micro-steps the per-rank share of a batch is split into
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20  # steps of linear warm-up
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    precision: str = "bf16"
    eval_every: int = 50
    eval_batches: int | None = 8  # None = the whole validation split
    log_every: int = 10
    seed: int = 0
    out: str | Path | None = None  # run folder: metrics, plot, checkpoints; None writes nothing
    ckpt_every: int | None = None  # steps; a checkpoint is also written at the end and on Ctrl-C
    keep_checkpoints: int = 2
    resume: bool = False  # continue from out/latest if it exists
    device: str = "auto"
    quiet: bool = False
    progress: bool | None = None  # None = on when stderr is a TTY and not quiet
    flops_per_token: float | None = None  # forward FLOPs per token (LM) or image, for MFU
    name: str | None = None  # what the run is called in the plot (default: model class)
    tensorboard: str | Path | None = None  # folder for TensorBoard event files (rank 0); None: none


@dataclass
class TrainResult:
    """What a run achieved; `losses` has one train loss per step run by this call."""

    steps: int
    tokens: int
    train_seconds: float
    wall_seconds: float
    train_loss: float
    val: dict[str, float]
    first_val: dict[str, float]
    losses: list[float]
    evals: list[tuple[int, dict[str, float]]]
    tokens_per_s: float
    stopped_by: str  # "budget", "callback", "interrupt"; "finished": resumed with no budget left
    flops_per_s: float | None = None
    peak_flops_per_s: float | None = None
    mfu: float | None = None
    checkpoint: Path | None = None
    metrics_path: Path | None = None
    plot_path: Path | None = None
    aux: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices): call before building a model to fix init."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay for ndim >= 2 (matrices, embeddings), none for gains/biases.

    `model.parameters()` already yields a shared parameter once, so sharing needs no care.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float],
               device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all parameters) where torch has it for the device.

    On the 2-core CPU the fused step of a 3.3M-parameter GPT took a third of the
    multi-tensor (foreach) step's time, about 5% of a whole train step; same update rule.
    """
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
        except (RuntimeError, ValueError):  # e.g. a parameter dtype the fused kernel lacks
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warm-up over `cfg.warmup` steps, then cosine from lr to lr*min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    low = cfg.lr * cfg.min_lr_ratio
    p = min(max(progress, 0.0), 1.0)
    return low + 0.5 * (1.0 + math.cos(math.pi * p)) * (cfg.lr - low)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise TrainError(f"unknown device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {name!r} requested but CUDA is not available")
    return dev


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Set float32 matmul precision for the run and restore the caller's afterwards."""
    prev = torch.get_float32_matmul_precision()
    if precision == "fp32-medium":
        torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast (fp32 master weights) or nothing."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


_RATES: dict[str, float] = {}


def matmul_rate(device: torch.device, precision: str, cache: Path | None = None) -> float:
    """Measured dense-matmul FLOP/s of this machine at a precision: the MFU denominator.

    Measured rather than looked up because CPU peaks depend on cores, AVX-512/AMX and
    thread count, which no table knows. Measured once per process (0.3 s); the cache file
    keeps the best rate ever seen, so one measurement taken under load does not stick.
    """
    threads = torch.get_num_threads()
    key = f"{_device_name(device)}|{precision}|torch {torch.__version__}|threads {threads}"
    path = (cache or data_mod.cache_dir()) / "matmul_rate.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in _RATES:
        _RATES[key] = _measure_matmul(device, precision)
        if _RATES[key] > table.get(key, 0.0):
            table[key] = _RATES[key]
            with contextlib.suppress(OSError):
                fileio.atomic_write(path, json.dumps(table, indent=1).encode())
    return max(_RATES[key], float(table.get(key, 0.0)))


def _measure_matmul(device: torch.device, precision: str) -> float:
    n = 2048 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    with precision_context(precision, device), autocast(precision, device):
        for _ in range(2):
            a @ b
        _sync(device)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.3 or reps < 3:
            a @ b
            reps += 1
        _sync(device)
        dt = time.perf_counter() - t0
    return 2 * n**3 * reps / dt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- memory guard


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """Bytes a new allocation can get on `device`, and where the number came from.

    CUDA: the device's free memory. CPU (Linux): MemAvailable from /proc/meminfo, lowered
    to a cgroup's remaining limit when one is set (a container's MemAvailable shows the
    host's memory). Elsewhere (None, reason): the guard is skipped.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    if device.type != "cpu":
        return None, f"no way to read free memory on {device.type}"
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None, "no /proc/meminfo on this system"
    avail = next((int(line.split()[1]) * 1024 for line in meminfo.splitlines()
                  if line.startswith("MemAvailable:")), None)
    if avail is None:
        return None, "no MemAvailable in /proc/meminfo"
    source = "MemAvailable"
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        with contextlib.suppress(OSError, ValueError):
            left = int(Path(limit).read_text()) - int(Path(usage).read_text())
            if left < avail:
                avail, source = max(left, 0), "the cgroup's memory limit"
    return avail, source


def memory_guard(plan: Any, *, batch: int, seq: int | None, precision: str, optimizer: bool,
                 device: torch.device, force: bool, what: str, hint: str) -> Any:
    """Refuse (a located BlockError, exit 1) a step whose estimated memory exceeds what the
    device has, before anything is allocated; `force` skips the refusal.

    The estimate (`graph.estimate_memory`) is deliberately on the high side, so a refused
    run may in fact fit: `--force` is the way to try. Several processes of one torchrun on
    a CPU host share its memory, so there the estimate counts once per local process.
    """
    from blockdsl.graph import estimate_memory, human_bytes
    from blockdsl.lang.errors import BlockError

    est = estimate_memory(plan, batch, seq, precision, optimizer=optimizer,
                          device_type=device.type)
    if force:
        return est
    avail, source = available_memory(device)
    if avail is None:
        return est
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    need = est.total * procs
    if need <= avail:
        return est
    each = f" x {procs} processes" if procs > 1 else ""
    raise BlockError(
        f"{what} of model {plan.name} needs about {human_bytes(need)} at batch {est.batch} x "
        f"seq {est.seq} ({precision}{each}: {est.parts()}), more than the "
        f"{human_bytes(avail)} available on {device.type} ({source})",
        plan.span, hint,
    )


# ----------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    """Rank and world of this process; a process group is set up when torchrun launched us."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @classmethod
    def setup(cls, device_name: str) -> _Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=resolve_device(device_name))
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_name)
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        owns = False
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), device, owns)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum over ranks in place; small CPU tensors travel via the device for NCCL."""
        if self.world > 1:
            import torch.distributed as dist

            buf = t.to(self.device) if self.device.type == "cuda" else t
            dist.all_reduce(buf)
            if buf is not t:
                t.copy_(buf)
        return t

    def broadcast_module(self, model: nn.Module) -> None:
        """Start every rank from rank 0's weights, however the model was initialised."""
        if self.world > 1:
            import torch.distributed as dist

            with torch.no_grad():
                for t in list(model.parameters()) + list(model.buffers()):
                    dist.broadcast(t.data, 0)

    def average_grads(self, params: list[nn.Parameter]) -> None:
        """One flat all-reduce of all gradients (a missing gradient counts as zero)."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch._utils._flatten_dense_tensors(grads)
        self.all_reduce_sum(flat).div_(self.world)
        for g, new in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(new)

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


# ----------------------------------------------------------------------------- checkpoints


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write out/ckpt-<step>/ atomically, then point out/latest at it; prune old ones.

    Weights go through `safetensors.torch.save_model`, which stores a shared (tied)
    parameter once; optimizer, schedule, RNG and data position go in train_state.pt;
    meta.json records the files' sha256 so a damaged checkpoint is named, not half-loaded.
    """
    from safetensors.torch import save_model

    final = out / f"{CKPT_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tmp-ckpt-"))
    try:
        # mkdtemp makes it 0700; a checkpoint folder gets a plain mkdir's mode (the umask's)
        os.chmod(tmp, 0o777 & ~fileio.umask())
        save_model(model, str(tmp / "model.safetensors"))
        payload = {"optimizer": optimizer.state_dict(), "rng": _rng_state(), **state}
        torch.save(payload, tmp / "train_state.pt")
        meta = {
            "step": step,
            "files": {f.name: _sha256(f) for f in sorted(tmp.iterdir())},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():  # safetensors writes its file 0600 whatever the umask
            os.chmod(f, 0o666 & ~fileio.umask())
        if final.exists():
            # a folder of this step from a lost tail (e.g. a damaged checkpoint newer than
            # the one a run resumed from): this run's state replaces it, never the reverse
            stale = Path(tempfile.mkdtemp(dir=out, prefix=".old-ckpt-"))
            os.replace(final, stale / final.name)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fileio.atomic_write(out / LATEST, final.name.encode())
    ckpts = sorted(p for p in out.glob(f"{CKPT_PREFIX}*") if p.is_dir())
    for old in ckpts[: max(0, len(ckpts) - keep)]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The folder out/latest names, or None when there is no `latest` file.

    `latest` is data, maybe damaged or hostile: it must name a `ckpt-<step>` folder
    directly inside `out` (after resolving symlinks), or this raises a TrainError rather
    than follow it (`../../../../etc` would otherwise be loaded, and later pruned).
    Only its first 256 bytes are read.
    """
    pointer = out / LATEST
    if not (pointer.exists() or pointer.is_symlink()):
        return None
    if pointer.is_symlink() or not pointer.is_file():
        # blockdsl writes `latest` as a small regular file; a link may lead to any file,
        # whose bytes would then be quoted below
        raise TrainError(f"{pointer} is not a regular file: remove it, or resume from a "
                         f"{CKPT_PREFIX}<step> folder by deleting it")
    try:
        with pointer.open("rb") as f:
            name = f.read(256).decode("utf-8", "replace").strip()
    except OSError as e:
        raise TrainError(f"cannot read {pointer}: {e.strerror or e}") from None
    path = out / name
    inside = False
    with contextlib.suppress(OSError, RuntimeError, ValueError):  # ValueError: a NUL byte
        inside = path.resolve().parent == out.resolve()
    if not (_CKPT_NAME.fullmatch(name) and inside):
        # quoted only when it reads as a name: never a damaged file's bytes
        shown = repr(name[:80]) if name.isascii() and name.isprintable() else "something"
        raise TrainError(f"{pointer} names {shown}, not a {CKPT_PREFIX}<step> folder inside "
                         f"{out}: refusing to follow it; delete {pointer} to resume from the "
                         "newest checkpoint that loads")
    return path


def checkpoint_folders(out: Path) -> list[Path]:
    """The `ckpt-<step>` folders directly inside `out` (no symlink leading out), newest first."""
    found = []
    with contextlib.suppress(OSError):
        root = out.resolve()
        for p in out.iterdir():
            m = _CKPT_NAME.fullmatch(p.name)
            with contextlib.suppress(OSError, RuntimeError):
                if m and p.is_dir() and p.resolve().parent == root:
                    found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def load_checkpoint(path: Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Verify and load a checkpoint folder; any damage becomes a one-line TrainError."""
    from safetensors.torch import load_model

    try:
        meta = json.loads((path / "meta.json").read_text())
        for name, digest in meta["files"].items():
            if _sha256(path / name) != digest:
                raise ValueError(f"{name} does not match its recorded sha256")
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"weights do not fit this model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]})"
            )
        state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except TrainError:
        raise
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TrainError(f"checkpoint {path} is corrupt or incompatible: {reason}") from None
    return state


# ----------------------------------------------------------------------------- output


def _strict_json(record: dict[str, Any]) -> str:
    """One metrics line: strict JSON, a non-finite number written as null (not `NaN`,
    which Python's json emits by default and no other JSON reader accepts)."""
    def fix(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return v

    return json.dumps(fix(record), allow_nan=False)


class _RunFiles:
    """The run folder (rank 0 only): metrics.jsonl, loss.png and checkpoints; and, when
    asked, TensorBoard event files in `tb_dir` fed the very rows metrics.jsonl gets."""

    def __init__(self, out: Path | None, resume_step: int | None,
                 tb_dir: Path | None = None) -> None:
        self.out = out
        self.tb = None
        if tb_dir is not None:
            from blockdsl.train.tblog import Writer

            try:
                self.tb = Writer(tb_dir, purge_step=None if resume_step is None else resume_step + 1)
            except OSError as e:
                raise TrainError(f"cannot write TensorBoard logs in {tb_dir}: "
                                 f"{e.strerror or e}") from None
        self.metrics_path = out / "metrics.jsonl" if out else None
        if self.metrics_path is None:
            self._fh = None
            return
        lines: list[str] = []
        if resume_step is not None and self.metrics_path.is_file():
            # keep the history up to the checkpoint; later lines belong to the lost tail.
            # The file is data, maybe damaged (a torn line, bytes that are not UTF-8, a row
            # whose step is no number): such lines are dropped, never a reason to crash.
            text = self.metrics_path.read_bytes().decode("utf-8", "replace")
            for line in text.splitlines():
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    step = rec.get("step", 0) if isinstance(rec, dict) else None
                    if isinstance(step, (int, float)) and not isinstance(step, bool) \
                            and step <= resume_step:
                        lines.append(_strict_json(rec))  # an older file's bare NaN -> null
        fileio.atomic_write(
            self.metrics_path, "".join(line + "\n" for line in lines).encode()
        )
        self._fh = self.metrics_path.open("a", buffering=1)

    def log(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(_strict_json(record) + "\n")
        if self.tb is not None:
            self.tb.log(record)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def history(self) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        train: list[tuple[int, float]] = []
        val: list[tuple[int, float]] = []
        if self.metrics_path is None or not self.metrics_path.is_file():
            return train, val
        for line in self.metrics_path.read_text().splitlines():
            r = json.loads(line)
            if r.get("kind") == "train":
                train.append((r["step"], r["loss"]))
            elif r.get("kind") == "eval":
                val.append((r["step"], r["val_loss"]))
        return train, val


def plot_losses(train: list[tuple[int, float]], val: list[tuple[int, float]], path: Path,
                title: str) -> Path:
    """Loss curve PNG via the Agg canvas directly: no pyplot global state is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", lw=1.5, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"cannot write to output folder {out}: {e.strerror or e}") from None


class _Interrupt:
    """Ctrl-C or SIGTERM asks to stop after the current step and checkpoint; a second one aborts.

    SIGTERM too because that is what torchrun sends its workers on Ctrl-C, and what batch
    schedulers send before they kill a job. Handlers are restored when training ends.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._prev: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._prev[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)


class _Progress:
    """A rich progress bar on stderr (loss, throughput, ETA), or nothing."""

    def __init__(self, enabled: bool, total: float | None, unit: str, step: str = "0") -> None:
        self.bar = None
        self.console = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True)
        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("step {task.fields[step]}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} " + unit + "/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.bar.add_task("train", total=total, step=step, loss="-", rate="-")
        self.bar.start()

    def update(self, completed: float, **fields: Any) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, **fields)

    def log(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ----------------------------------------------------------------------------- the loop


def _task_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[Tensor, Tensor]], precision: str,
             device: torch.device, dist: _Dist | None = None,
             byte_level: bool = False,
             bytes_per_token: float | None = None) -> dict[str, float]:
    """Mean validation loss (and bits per byte or accuracy); batches are sharded by rank.

    Bits per byte = nats per token / ln 2 / bytes per token: 1 for byte-level text, the
    validation text's measured ratio for tokenized data (its meta.json), so runs on bytes
    and on any tokenizer compare on one scale.
    """
    dist = dist or _Dist(device=device)
    was_training = model.training
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64)  # loss sum, count, correct
    with autocast(precision, device):
        for i, (x, y) in enumerate(batches):
            if i % dist.world != dist.rank:
                continue
            x, y = x.to(device), y.to(device)
            logits = model(x).logits.float().flatten(0, -2)
            t = y.flatten()
            stats[0] += F.cross_entropy(logits, t, reduction="sum").item()
            stats[1] += t.numel()
            stats[2] += (logits.argmax(-1) == t).sum().item()
    model.train(was_training)
    stats = dist.all_reduce_sum(stats)
    loss = float(stats[0] / stats[1])
    metrics = {"val_loss": loss}
    if byte_level and bytes_per_token is None:
        bytes_per_token = 1.0
    if bytes_per_token is not None:
        metrics["val_bpb"] = loss / math.log(2) / bytes_per_token
    if model.io.task == "classify":
        metrics["val_acc"] = float(stats[2] / stats[1])
    return metrics


def accumulate_gradients(model: nn.Module, x: Tensor, y: Tensor, accum: int, precision: str,
                         device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
    """Add the gradient of the mean loss over (x, y) to `.grad`, in `accum` equal micro-batches.

    Each micro-loss is divided by `accum`, so the sum equals the full batch's mean loss and
    its gradient. Returns the detached task loss and each aux loss, averaged the same way.
    """
    micro = len(x) // accum
    step_loss = torch.zeros((), device=device)
    step_aux: dict[str, Tensor] = {}
    for m in range(accum):
        xb = x[m * micro: (m + 1) * micro].to(device, non_blocking=True)
        yb = y[m * micro: (m + 1) * micro].to(device, non_blocking=True)
        with autocast(precision, device):
            out = model(xb)
            task_loss = _task_loss(out.logits, yb)
            loss = task_loss + sum(out.aux.values())
        (loss / accum).backward()
        step_loss += task_loss.detach() / accum
        for k, v in out.aux.items():
            step_aux[k] = step_aux.get(k, 0.0) + v.detach().float() / accum
    return step_loss, step_aux


def _validate(cfg: TrainConfig) -> None:
    if cfg.precision not in PRECISIONS:
        raise TrainError(f"precision {cfg.precision!r} is not one of {', '.join(PRECISIONS)}")
    for name in ("steps", "tokens", "seconds", "eval_every", "log_every", "ckpt_every"):
        v = getattr(cfg, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise TrainError(f"{name} must be a positive finite number, got {v}")
    if cfg.batch_size < 1 or cfg.accum < 1:
        raise TrainError(f"batch_size ({cfg.batch_size}) and accum ({cfg.accum}) must be >= 1")
    if cfg.warmup < 0:
        raise TrainError(f"warmup must be >= 0, got {cfg.warmup}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise TrainError(f"lr must be a positive finite number, got {cfg.lr}")
    for name in ("weight_decay", "grad_clip", "min_lr_ratio"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0):
            raise TrainError(f"{name} must be a finite number >= 0, got {v}")


def train(model: nn.Module, config: TrainConfig | None = None, *,
          dataset: TaskData | None = None, on_eval: EvalCallback | None = None) -> TrainResult:
    """Train `model` (a blockdsl module: `model(x).logits`, `.aux`, `.task`) in place.

    `dataset` lets a caller (the search) load data once for many runs; by default it is
    loaded from `config.data` and checked against the model. Launched by torchrun, every
    rank calls this and takes its shard of each global batch; only rank 0 writes files.
    Raises TrainError for anything the user can fix; an exception from `on_eval` is
    re-raised once every rank has stopped.
    """
    cfg = config or TrainConfig()
    _validate(cfg)
    if cfg.steps is None and cfg.tokens is None and cfg.seconds is None:
        cfg = TrainConfig(**{**asdict(cfg), "steps": 200})
    dist = _Dist.setup(cfg.device)
    try:
        with precision_context(cfg.precision, dist.device), _Interrupt() as interrupt:
            run = _Run(model, cfg, dist, dataset, on_eval, interrupt)
            try:
                return run.loop()
            finally:
                run.close()
    finally:
        dist.close()


class _Run:
    """One call of `train`: set-up, the step, evaluation, checkpoints, and the result."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, dist: _Dist,
                 dataset: TaskData | None, on_eval: EvalCallback | None,
                 interrupt: _Interrupt) -> None:
        self.wall0 = time.perf_counter()
        self.model, self.cfg, self.dist, self.on_eval = model, cfg, dist, on_eval
        self.interrupt = interrupt
        self.device = dist.device
        self.step, self.tokens, self.train_time = 0, 0, 0.0
        self.files = _RunFiles(None, None)
        self.bar = _Progress(False, None, "")
        error: TrainError | None = None
        try:
            self._setup(dataset)
        except TrainError as e:
            error = e
        # every rank must learn that one failed, or the others wait in a collective forever
        failed = dist.all_reduce_sum(torch.tensor([0.0 if error is None else 1.0]))[0] > 0
        if error is not None:
            raise error
        if failed:
            raise TrainError("another process failed to set up training; see rank 0's error")
        dist.broadcast_module(model)
        self.start_time = self.train_time
        # Resuming a run whose checkpoint already spent the budget: nothing to train, and
        # nothing to write (a second final evaluation would duplicate the last eval row).
        self.finished = self.resumed and not self.budget_left()
        tb = Path(cfg.tensorboard).expanduser() if cfg.tensorboard and dist.main else None
        self.files = _RunFiles(self.out if dist.main and not self.finished else None,
                               self.step if self.resumed else None,
                               tb if not self.finished else None)
        self.peak = None
        if cfg.flops_per_token and dist.main:
            self.peak = matmul_rate(self.device, cfg.precision) * dist.world
        self.verbose = dist.main and not cfg.quiet
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        total = float(self.total_steps) if self.total_steps is not None else cfg.seconds
        self.bar = _Progress(bool(show) and self.verbose and not self.finished, total,
                             "tok" if self.ds.task == "lm" else "img", self.step_text())
        self.val_batches = self.ds.val_batches(cfg.batch_size, cfg.eval_batches)
        self.losses: list[Tensor] = []
        self.aux_steps: dict[str, list[Tensor]] = {}
        self.evals: list[tuple[int, dict[str, float]]] = []
        self.window_time = 0.0
        self.stopped_by = "budget"
        self.pending_error: BaseException | None = None
        self.last_ckpt: Path | None = None
        self.last_eval_step = -1

    def _setup(self, dataset: TaskData | None) -> None:
        cfg, dist, model = self.cfg, self.dist, self.model
        if (cfg.precision == "bf16" and self.device.type == "cuda"
                and not torch.cuda.is_bf16_supported()):
            raise TrainError("this GPU has no bf16 support; use precision fp32 or fp32-medium")
        try:
            self.ds = dataset or data_mod.load_for_model(model, cfg.data, cfg.seq_len)
        except DataError as e:
            raise TrainError(str(e)) from None
        if model.io.task != self.ds.task:
            raise TrainError(f"model task {model.io.task!r} does not fit "
                             f"{self.ds.task!r} data {self.ds.name}")
        if cfg.batch_size % (dist.world * cfg.accum):
            raise TrainError(f"batch_size {cfg.batch_size} must divide evenly over "
                             f"{dist.world} process(es) x accum {cfg.accum}")
        self.per_step = cfg.batch_size * self.ds.units_per_sample
        self.total_steps = cfg.steps
        if cfg.tokens is not None:
            by_tokens = math.ceil(cfg.tokens / self.per_step)
            self.total_steps = by_tokens if cfg.steps is None else min(cfg.steps, by_tokens)
        byte_level = getattr(self.ds, "vocab_size", None) == data_mod.BYTE_VOCAB
        self.bytes_per_token = getattr(self.ds, "bytes_per_token", 1.0 if byte_level else None)

        if cfg.tensorboard and dist.main:
            from blockdsl.train.tblog import TensorBoardMissing, require

            try:
                require()
            except TensorBoardMissing as e:
                raise TrainError(str(e)) from None
        self.out = Path(cfg.out).expanduser() if cfg.out is not None else None
        ckpt = latest_checkpoint(self.out) if self.out is not None else None
        found = checkpoint_folders(self.out) if self.out is not None else []
        if self.out is not None and dist.main:
            _check_out(self.out)
            if (ckpt is not None or found) and not cfg.resume:
                raise TrainError(f"{self.out} already holds a checkpoint "
                                 f"({(ckpt or found[0]).name}); "
                                 "resume it or choose another output folder")
        model.to(self.device)
        seed_everything(cfg.seed)  # identical on every rank, so rank 0's RNG state fits all
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_adamw(param_groups(model, cfg.weight_decay), cfg.lr, cfg.betas, self.device)
        self.resumed = cfg.resume and (ckpt is not None or bool(found))
        if cfg.resume and not self.resumed and self.out is not None and dist.main:
            # not an error (a first run may ask to resume), but a mistyped --out must not
            # pass for a resume: say that this one starts afresh
            print(f"note: {self.out} holds no checkpoint to resume: starting a new run there",
                  file=sys.stderr, flush=True)
        self.resumed_from: Path | None = None
        self.recent: dict[str, list[Tensor]] = {}
        if self.resumed:
            if ckpt is not None:
                state = load_checkpoint(ckpt, model, self.opt)
            else:
                ckpt, state = self._newest_loadable(found)
            for name in ("seed", "batch_size"):
                if state["config"][name] != getattr(cfg, name):
                    raise TrainError(
                        f"checkpoint {ckpt} was made with {name} {state['config'][name]}, "
                        f"not {getattr(cfg, name)}: the data order would change"
                    )
            self.resumed_from = ckpt
            self.step, self.tokens = state["step"], int(state["tokens"])
            self.train_time = state["train_time"]
            # the per-step losses of the log window the checkpoint fell in, so the first
            # logged window after a resume averages the same steps as an uninterrupted run
            self.recent = {k: list(v.unbind()) for k, v in state.get("recent", {}).items()}
            _set_rng_state(state["rng"])

    def _newest_loadable(self, found: list[Path]) -> tuple[Path, dict[str, Any]]:
        """No `latest` (lost, or never written): the newest checkpoint that verifies and
        loads, said on stderr; if none does, refuse rather than start over on top of them."""
        skipped: list[str] = []
        for path in found:
            try:
                state = load_checkpoint(path, self.model, self.opt)
            except TrainError as e:
                skipped.append(f"{path.name}: {str(e).split(': ', 1)[-1]}")
                continue
            if self.dist.main and not self.cfg.quiet:
                extra = f" (skipped {'; '.join(skipped)})" if skipped else ""
                print(f"note: {self.out} has no '{LATEST}': resuming from {path.name}, the "
                      f"newest checkpoint that loads{extra}", file=sys.stderr, flush=True)
            return path, state
        raise TrainError(f"{self.out} has no '{LATEST}' and none of its checkpoints loads "
                         f"({'; '.join(skipped)[:400]}); nothing was changed")

    # -- pieces of the loop

    def say(self, text: str) -> None:
        if self.bar.bar is not None:
            self.bar.log(text)
        elif self.verbose:
            print(text, file=sys.stderr, flush=True)

    def progress(self) -> float:
        """Fraction of the budget used: steps after warm-up, or train seconds, whichever leads."""
        cfg, p = self.cfg, 0.0
        if self.total_steps is not None:
            p = (self.step - cfg.warmup) / max(1, self.total_steps - cfg.warmup)
        if cfg.seconds is not None:
            p = max(p, self.train_time / cfg.seconds)
        return p

    def step_text(self) -> str:
        """The bar's step: `9/300`, or with a seconds budget only, its share used so far."""
        if self.total_steps is not None:
            return f"{self.step}/{self.total_steps}"
        return f"{self.step} ({min(self.train_time / self.cfg.seconds, 1.0):.0%} of " \
               f"{self.cfg.seconds:g} s)"

    def budget_left(self) -> bool:
        if self.total_steps is not None and self.step >= self.total_steps:
            return False
        return self.cfg.seconds is None or self.train_time < self.cfg.seconds

    def train_step(self) -> None:
        cfg, dist, device = self.cfg, self.dist, self.device
        t0 = time.perf_counter()
        lr = lr_at(self.step, self.progress(), cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        x, y = self.ds.train_batch(self.step, cfg.batch_size, cfg.seed)
        per_rank = cfg.batch_size // dist.world
        lo = dist.rank * per_rank
        loss, aux = accumulate_gradients(self.model, x[lo: lo + per_rank],
                                         y[lo: lo + per_rank], cfg.accum, cfg.precision, device)
        dist.average_grads(self.params)
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                     if cfg.grad_clip > 0 else None)
        self.check_finite(loss, aux, grad_norm)  # before the update: the weights stay as they are
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(device)
        self.step += 1
        self.tokens += self.per_step
        # one small all-reduce keeps loss, stop request and clock identical on all ranks
        keys = sorted(aux)
        shared = torch.stack(
            [loss.float().cpu()] + [aux[k].cpu() for k in keys]
            + [torch.tensor(float(self.interrupt.requested)),
               torch.tensor(time.perf_counter() - t0)]
        ).double()
        shared = dist.all_reduce_sum(shared) / dist.world
        dt = float(shared[-1])
        self.train_time += dt
        self.window_time += dt
        self.losses.append(shared[0].float())
        for i, k in enumerate(keys):
            self.aux_steps.setdefault(k, []).append(shared[1 + i].float())
        if shared[-2] > 0:
            self.stopped_by = "interrupt"
        timed = cfg.seconds is not None and self.total_steps is None
        rate = self.per_step / max(dt, 1e-9)
        self.bar.update(self.train_time if timed else self.step, step=self.step_text(),
                        loss=f"{float(shared[0]):.4f}", rate=f"{rate:,.0f}")
        if self.step % cfg.log_every == 0:
            self.log_train(lr, grad_norm)

    def check_finite(self, loss: Tensor, aux: dict[str, Tensor], grad_norm: Tensor | None) -> None:
        """Stop the run at the step whose loss, aux loss or gradient norm is NaN or infinite.

        Checked on every rank before the optimizer applies the step (one flag is summed over
        ranks, so all stop together), so no update made of NaN reaches the weights; the
        run then ends without writing a checkpoint, and the last one written stays `latest`.
        """
        vals = [loss.detach().float().reshape(())]
        vals += [v.detach().float().reshape(()) for v in aux.values()]
        if grad_norm is not None:
            vals.append(grad_norm.detach().float().reshape(()))
        bad = (~torch.isfinite(torch.stack(vals))).any().float().cpu().reshape(1)
        if float(self.dist.all_reduce_sum(bad)[0]) == 0:
            return
        step = self.step + 1  # the step being computed, numbered as its metrics row would be
        if not math.isfinite(float(loss)):
            what = f"non-finite training loss ({float(loss)})"
        elif any(not math.isfinite(float(v)) for v in aux.values()):
            what = "non-finite aux loss (" + ", ".join(
                f"{k} {float(v)}" for k, v in aux.items() if not math.isfinite(float(v))) + ")"
        elif grad_norm is not None and not math.isfinite(float(grad_norm)):
            what = f"non-finite gradient norm ({float(grad_norm)})"
        else:
            what = "a non-finite loss on another process"
        self.diverged(step, what)

    def diverged(self, step: int, what: str) -> None:
        """Log a strict-JSON error row and raise the one-line TrainError that ends the run."""
        self.files.log({"kind": "error", "step": step, "loss": None,
                        "error": f"{what} at step {step}"})
        if self.out is None:
            kept = "nothing was saved (no output folder)"
        else:
            last = self.last_ckpt or latest_checkpoint(self.out)
            kept = (f"the last checkpoint, {last}, is kept" if last is not None
                    else "no checkpoint had been written (see --ckpt-every)")
        raise TrainError(f"{what} at step {step}: training diverged and was stopped; {kept}; "
                         "try a lower learning rate")

    def window(self, key: str, vals: list[Tensor]) -> list[Tensor]:
        """The last `log_every` per-step values, reaching into the ones the resumed
        checkpoint carried when this call has run fewer steps than that."""
        n = self.cfg.log_every
        if len(vals) >= n:
            return vals[-n:]
        prior = self.recent.get(key, [])
        return prior[max(0, len(prior) - (n - len(vals))):] + vals

    def log_train(self, lr: float, grad_norm: Tensor | None) -> None:
        n = min(self.cfg.log_every, len(self.losses))  # steps timed in this call's window
        rec: dict[str, Any] = {
            "kind": "train", "step": self.step,
            "loss": float(torch.stack(self.window("loss", self.losses)).mean()), "lr": lr,
            "tokens": self.tokens, "tokens_per_s": n * self.per_step / max(self.window_time, 1e-9),
            "train_seconds": self.train_time,
        }
        if grad_norm is not None:
            rec["grad_norm"] = float(grad_norm)
        for k, vals in self.aux_steps.items():
            rec[f"aux/{k}"] = float(torch.stack(self.window(f"aux/{k}", vals)).mean())
        self.files.log(rec)
        self.window_time = 0.0

    def run_eval(self) -> bool:
        """Evaluate, log, call back; True when the callback asked (on rank 0) to stop."""
        metrics = evaluate(self.model, self.val_batches, self.cfg.precision, self.device,
                           self.dist, bytes_per_token=self.bytes_per_token)
        if not math.isfinite(metrics["val_loss"]):  # identical on all ranks (all-reduced)
            self.diverged(self.step, f"non-finite validation loss ({metrics['val_loss']})")
        self.last_eval_step = self.step
        recent = self.window("loss", self.losses)
        if recent:
            metrics["train_loss"] = float(torch.stack(recent).mean())
        # an int like the train rows' (a float loses exactness past 2**53 and reads oddly)
        metrics.update(tokens=int(self.tokens), train_seconds=self.train_time)
        self.evals.append((self.step, metrics))
        self.files.log({"kind": "eval", "step": self.step, **metrics})
        extra = "".join(f"  {k} {metrics[k]:.4f}" for k in ("val_bpb", "val_acc") if k in metrics)
        self.say(f"step {self.step:>6}  val_loss {metrics['val_loss']:.4f}{extra}")
        stop = 0.0
        if self.on_eval is not None and self.dist.main:
            try:
                stop = 1.0 if self.on_eval(self.step, dict(metrics)) else 0.0
            except BaseException as e:  # noqa: BLE001 - re-raised after every rank stops
                self.pending_error, stop = e, 1.0
        return bool(self.dist.all_reduce_sum(torch.tensor([stop]))[0] > 0)

    def checkpoint(self) -> None:
        if self.out is None or not self.dist.main:
            return
        if self.last_ckpt is not None and self.last_ckpt.name == f"{CKPT_PREFIX}{self.step:08d}":
            return  # the end-of-run checkpoint of a step that --ckpt-every just wrote
        recent = {"loss": self.window("loss", self.losses)}
        recent.update({f"aux/{k}": self.window(f"aux/{k}", v) for k, v in self.aux_steps.items()})
        state = {
            "step": self.step, "tokens": self.tokens, "train_time": self.train_time,
            "recent": {k: torch.stack(v) for k, v in recent.items() if v},
            "config": {k: (str(v) if isinstance(v, Path) else v)
                       for k, v in asdict(self.cfg).items()},
        }
        try:
            self.last_ckpt = save_checkpoint(self.out, self.step, self.model, self.opt, state,
                                             self.cfg.keep_checkpoints)
        except OSError as e:
            raise TrainError(f"cannot write checkpoint in {self.out}: {e.strerror or e}") from None

    # -- the loop and its result

    def loop(self) -> TrainResult:
        cfg = self.cfg
        if self.finished:
            return self.finished_result()
        self.model.train()
        if not self.resumed and self.run_eval():
            self.stopped_by = "callback"
        while self.stopped_by == "budget" and self.budget_left():
            self.train_step()
            if self.step % cfg.eval_every == 0 and self.run_eval():
                self.stopped_by = "callback" if self.stopped_by == "budget" else self.stopped_by
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                self.checkpoint()
        if self.pending_error is not None:
            raise self.pending_error
        if self.last_eval_step != self.step:
            self.run_eval()
        self.checkpoint()
        return self.result()

    def result(self) -> TrainResult:
        cfg = self.cfg
        # throughput of this call's steps only, so a resumed run reports its own speed
        run_time = self.train_time - self.start_time
        tok_s = len(self.losses) * self.per_step / run_time if run_time > 0 else 0.0
        flops = 3 * cfg.flops_per_token * tok_s if cfg.flops_per_token else None
        losses = [float(v) for v in self.losses]
        recent = [float(v) for v in self.window("loss", self.losses)]
        r = TrainResult(
            steps=self.step, tokens=self.tokens, train_seconds=self.train_time,
            wall_seconds=time.perf_counter() - self.wall0,
            train_loss=float(np.mean(recent)) if recent else float("nan"),
            val=self.evals[-1][1] if self.evals else {},
            first_val=self.evals[0][1] if self.evals else {},
            losses=losses, evals=self.evals, tokens_per_s=tok_s, stopped_by=self.stopped_by,
            flops_per_s=flops, peak_flops_per_s=self.peak,
            mfu=flops / self.peak if flops and self.peak else None,
            checkpoint=self.last_ckpt, metrics_path=self.files.metrics_path,
            aux={k: float(torch.stack(self.window(f"aux/{k}", v)).mean())
                 for k, v in self.aux_steps.items()},
        )
        if self.dist.main and self.out is not None:
            self.files.log({"kind": "summary", "step": self.step, **_summary(r),
                            "env": run_environment(self.model, self.device, self.ds)})
            self.files.close()
            train_hist, val_hist = self.files.history()
            title = f"{cfg.name or type(self.model).__name__} on {Path(self.ds.name).name}"
            r.plot_path = plot_losses(train_hist, val_hist, self.out / "loss.png", title)
        return r

    def finished_result(self) -> TrainResult:
        """The result of a run resumed after it had finished, read from its files, which are
        left exactly as they were (stopped_by "finished")."""
        metrics = self.out / "metrics.jsonl" if self.out is not None else None
        evals: list[tuple[int, dict[str, float]]] = []
        if metrics is not None and metrics.is_file():
            for line in metrics.read_text().splitlines():
                with contextlib.suppress(ValueError, AttributeError):
                    rec = json.loads(line)
                    if rec.get("kind") == "eval":
                        evals.append((rec["step"], {k: v for k, v in rec.items()
                                                    if k not in ("kind", "step")}))
        val = evals[-1][1] if evals else {}
        plot = self.out / "loss.png" if self.out is not None else None
        return TrainResult(
            steps=self.step, tokens=self.tokens, train_seconds=self.train_time,
            wall_seconds=time.perf_counter() - self.wall0,
            train_loss=float(val.get("train_loss") or float("nan")), val=val,
            first_val=evals[0][1] if evals else {}, losses=[], evals=evals, tokens_per_s=0.0,
            stopped_by="finished", checkpoint=self.resumed_from,
            metrics_path=metrics if metrics is not None and metrics.is_file() else None,
            plot_path=plot if plot is not None and plot.is_file() else None,
        )

    def close(self) -> None:
        self.bar.close()
        self.files.close()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit(where: Path) -> str | None:
    """The checkout's commit (+ "-dirty" with uncommitted edits), when blockdsl runs from
    one: the version string stays 0.1.0 across commits that change the numbers."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "--show-toplevel",
                               "--short=12", "HEAD"], capture_output=True, text=True, timeout=5)
        top, _, commit = head.stdout.strip().partition("\n")
        # an installed copy inside some other repository (a venv in a project) is not ours
        if head.returncode != 0 or Path(top).resolve() != where.resolve().parent:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "-uno", "."],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def run_environment(model: nn.Module, device: torch.device, ds: Any) -> dict[str, Any]:
    """What a run's numbers depend on besides the spec, the flags and the seed.

    Measured (docs/train.md, "A tiny GPT on the default corpus"): the same seed gives
    bit-identical metrics run after run, and here 1 and 2 threads gave identical ones too;
    but the code version (kernel defaults, e.g. the bf16 attention path), the CPU's
    instruction set (oneDNN's bf16 kernels: `ONEDNN_MAX_CPU_ISA=AVX2` changed the loss in
    the 5th digit at step 0), the kernels `compile --tune` picked, and the corpus (the
    default one is this Python's standard library) each change them. The summary row
    records all of these, so two runs' figures can be told apart before they are compared.
    """
    import blockdsl

    kernels = sorted({f"{type(m).__name__}.{k}={getattr(m, k)}" for m in model.modules()
                      for k in ("impl", "dispatch") if isinstance(getattr(m, k, None), str)})
    env: dict[str, Any] = {
        "blockdsl": blockdsl.__version__, "torch": torch.__version__,
        "python": platform.python_version(), "device": str(device),
        "threads": torch.get_num_threads(), "kernels": kernels,
        "data": getattr(ds, "name", None), "data_units": len(getattr(ds, "tokens", ())) or None,
    }
    commit = _git_commit(Path(blockdsl.__file__).parent)
    if commit:
        env["git"] = commit
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = _cpu_name()
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        for var in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):  # restrict kernels
            if os.environ.get(var):
                env[var.lower()] = os.environ[var]
    return env


def _summary(r: TrainResult) -> dict[str, Any]:
    """The JSON-friendly part of a result (the metrics file's last line)."""
    return {
        "tokens": r.tokens, "train_seconds": r.train_seconds, "wall_seconds": r.wall_seconds,
        "train_loss": r.train_loss, **r.val, "first_val_loss": r.first_val.get("val_loss"),
        "tokens_per_s": r.tokens_per_s, "flops_per_s": r.flops_per_s,
        "peak_flops_per_s": r.peak_flops_per_s, "mfu": r.mfu, "stopped_by": r.stopped_by,
    }
