"""Whole-model train step: blockdsl tuned vs blockdsl untuned vs x-transformers, same process.

For each spec and precision every contender runs the same step — forward (under bf16
autocast with fp32 master weights for "bf16"), cross-entropy (+ the model's aux losses),
backward, AdamW (fused where torch has it, the same for everyone), zero_grad — on the
same batches, round-robin so machine noise spreads evenly; tokens/s is from the median
step. Contenders:
  blockdsl:tuned      `compile --tune --batch B` run first (in a private cache dir) for this
                      precision and batch, then the model lowered with the tuned choices;
  blockdsl:untuned    the lowering's default rules, no measurements (BLOCKDSL_TUNE=off);
  blockdsl:reference  every choosable kernel forced to its reference implementation
                      (manual attention, per-expert loop dispatch): the straightforward
                      module a user would write by hand;
  x-transformers      for benchmarks/specs/dense-gpt only, configured to the same architecture:
                      the parameter counts must be equal, and with the blockdsl weights
                      copied in the logits must agree (checked each run, or the benchmark
                      stops). Both of its attention paths
                      run (default einsum attention, and attn_flash=True, i.e. SDPA) and the
                      faster one is the reference for the ratio.
Peak memory is the process's resident-set high-water mark during one step above the
resident set before it (Linux: VmHWM after resetting it through /proc/self/clear_refs,
allocator caches trimmed first; the gradients are allocated within it), plus the bytes of
parameters and AdamW state; on CUDA the same with torch.cuda.max_memory_allocated.

`x-transformers` is a benchmark-only extra (`pip install -e ".[bench]"`).

    .venv/bin/python benchmarks/train_step.py [--specs a,b] [--precisions fp32,bf16] [--rounds 6]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Passive OpenMP waiting unless the caller chose (see benchmarks/moe_layer.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import blockdsl  # noqa: E402
from blockdsl.lower import build_from_plan  # noqa: E402
from blockdsl.primitives import tunable  # noqa: E402
from blockdsl.train import autocast, precision_context, seed_everything  # noqa: E402
from blockdsl.train.data import load_for_model  # noqa: E402
from blockdsl.tune import with_impls  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DENSE_GPT = "benchmarks/specs/dense-gpt.block"
SPECS = (
    DENSE_GPT,
    "specs/tiny/gpt.block",
    "specs/tiny/widenet.block",
    "specs/tiny/moeut.block",
    "specs/tiny/altup.block",
    "specs/tiny/brainformer.block",
    "specs/tiny/vit.block",
)
PRECISIONS = ("fp32", "fp32-medium", "bf16")
TARGET = 1.3  # tuned blockdsl vs the best x-transformers configuration, same precision

# x-transformers configurations of the same dense architectures, keyed by the spec's model name.
# specs/tiny/gpt.block has none: its SwiGLU FFN is bias-free, and x-transformers' GLU input
# projection always carries a bias, so no configuration of it is the same model.
XT_CONFIGS = {
    "dense_gpt": dict(num_tokens=256, max_seq_len=256, depth=4, dim=256, heads=4),
}


def xt_model(name: str, flash: bool) -> torch.nn.Module | None:
    cfg = XT_CONFIGS.get(name)
    if cfg is None:
        return None
    from x_transformers import Decoder, TransformerWrapper

    c = dict(cfg)
    wrapper = {k: c.pop(k) for k in ("num_tokens", "max_seq_len", "use_abs_pos_emb", "tie_embedding")
               if k in c}
    return TransformerWrapper(**wrapper, attn_layers=Decoder(**c, attn_flash=flash))


def copy_into_xt(bd: torch.nn.Module, xt: torch.nn.Module) -> None:
    """blockdsl dense_gpt weights -> x-transformers: the fused QKV is split, its positional
    embedding is scaled by d**-0.5 on use, and its norm gains are stored minus one
    (`unit_offset`)."""
    sd = {k: v.detach() for k, v in bd.state_dict().items()}
    d = xt.token_emb.emb.weight.shape[1]
    off = float(xt.attn_layers.final_norm.unit_offset)
    out = {"token_emb.emb.weight": sd["stem.tok.weight"],
           "pos_emb.emb.weight": sd["stem.pos.weight"] * d**0.5,
           "attn_layers.final_norm.gamma": sd["final_norm.weight"] - off,
           "to_logits.weight": sd["head.proj.weight"]}
    for i, unit in enumerate(bd.units):
        attn, ffn = unit[0], unit[1]
        a, f = 2 * i, 2 * i + 1
        pre = f"attn_layers.layers.{a}"
        out[f"{pre}.0.0.gamma"] = attn.norms[0].weight.detach() - off
        q, k, v = attn.fn.qkv.weight.detach().chunk(3)
        out |= {f"{pre}.1.to_q.weight": q, f"{pre}.1.to_k.weight": k, f"{pre}.1.to_v.weight": v,
                f"{pre}.1.to_out.weight": attn.fn.out.weight.detach()}
        pre = f"attn_layers.layers.{f}"
        out[f"{pre}.0.0.gamma"] = ffn.norms[0].weight.detach() - off
        lin = [m for m in ffn.fn.modules() if isinstance(m, torch.nn.Linear)]
        for i_lin, name in ((0, "ff.0.0"), (1, "ff.2")):
            out[f"{pre}.1.{name}.weight"] = lin[i_lin].weight.detach()
            out[f"{pre}.1.{name}.bias"] = lin[i_lin].bias.detach()
    missing = set(xt.state_dict()) - set(out)
    if missing:
        raise RuntimeError(f"x-transformers weights not mapped: {sorted(missing)[:4]}")
    xt.load_state_dict(out)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=1e-4)


def make_step(model, opt, precision: str, device: torch.device):
    def step(x, y) -> float:
        with autocast(precision, device):
            out = model(x)
            logits = out.logits if hasattr(out, "logits") else out
            loss = F.cross_entropy(logits.float().flatten(0, -2), y.flatten())
            aux = sum(out.aux.values()) if hasattr(out, "aux") else 0.0
        (loss + aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters and optimizer state: what is resident before a step. Gradients are not
    counted here: the step allocates them (zero_grad frees them), so its growth has them."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v) and v.dim())
    return n


def _proc_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def step_peak_bytes(step, batch, device: torch.device) -> int | None:
    """Resident-set growth over one step (CUDA: peak allocated growth); None if not measurable."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(*batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    base = _proc_kib("VmRSS")
    step(*batch)
    peak = _proc_kib("VmHWM")
    return None if base is None or peak is None else max(0, peak - base) * 1024


def run_spec(spec: str, precision: str, args, device: torch.device) -> list[dict]:
    plan = blockdsl.resolve(str(ROOT / spec))
    rows: list[dict] = []
    builders = {}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["BLOCKDSL_CACHE"] = cache
        t0 = time.perf_counter()
        from blockdsl.tune import tune_plan

        decisions = tune_plan(plan, device=device, precision=precision, verbose=False, batch=args.batch)
        tune_s = time.perf_counter() - t0
        seed_everything(0)
        builders["blockdsl:tuned"] = build_from_plan(plan, device=device, precision=precision,
                                                     batch=args.batch)
    os.environ["BLOCKDSL_TUNE"] = "off"
    try:
        seed_everything(0)
        builders["blockdsl:untuned"] = blockdsl.build(plan, device=device, precision=precision)
        seed_everything(0)
        # every choosable kernel forced to its reference implementation
        ref_plan = with_impls(plan, lambda layer: tunable(layer.prim).reference)
        builders["blockdsl:reference"] = blockdsl.build(ref_plan, device=device,
                                                        precision=precision)
    finally:
        os.environ.pop("BLOCKDSL_TUNE", None)
    bd = builders["blockdsl:untuned"]
    n_bd = sum(p.numel() for p in bd.parameters())
    for flash in (False, True):
        try:
            xt = xt_model(plan.name, flash)
        except ImportError:
            print("  (x-transformers not installed: pip install -e '.[bench]')")
            break
        if xt is None:
            break
        xt = xt.to(device)
        n_xt = sum(p.numel() for p in xt.parameters())
        if n_xt != n_bd:
            raise RuntimeError(f"x-transformers has {n_xt:,} parameters, blockdsl {n_bd:,}: "
                               "not the same model")
        builders["x-transformers" + (":flash" if flash else "")] = xt
    data = load_for_model(bd)
    batches = [data.train_batch(i, args.batch, seed=0) for i in range(args.rounds + 2)]
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    if plan.name == "dense_gpt" and "x-transformers" in builders:
        xt = builders["x-transformers"]
        copy_into_xt(bd, xt)
        with torch.no_grad():
            a, b = bd(batches[0][0]).logits, xt(batches[0][0])
        err = float((a - b).abs().max() / b.abs().max())
        if err > 1e-4:
            raise RuntimeError(f"x-transformers logits differ from blockdsl's by {err:.1e}: "
                               "not the same function")
        builders["x-transformers:flash"].load_state_dict(xt.state_dict())
        print(f"  same function: blockdsl and x-transformers logits agree to {err:.1e} (same weights)")
    steps, opts = {}, {}
    for name, m in builders.items():
        opts[name] = make_optimizer(m)
        steps[name] = make_step(m, opts[name], precision, device)
    times: dict[str, list[float]] = {n: [] for n in builders}
    mem: dict[str, int | None] = {}
    with precision_context(precision, device):
        names = list(steps)
        for r in range(args.rounds + 1):  # round 0 warms up
            # Rotated order: with the same weights and batch, contenders route alike, and
            # the first to see a new per-expert matmul shape pays oneDNN's compile of it.
            for name in names[r % len(names):] + names[: r % len(names)]:
                step = steps[name]
                if r == 0:
                    step(*batches[0])
                    mem[name] = step_peak_bytes(step, batches[1], device)
                    continue
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                step(*batches[1 + r])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
    tokens = args.batch * (plan.seq if plan.task == "lm" else 1)
    unit = "tok" if plan.task == "lm" else "img"
    choices = sorted({rec["choice"] for rec in decisions.values()})
    for name, m in builders.items():
        med = statistics.median(times[name])
        peak = mem[name]
        rows.append(dict(spec=spec, precision=precision, who=name, rate=tokens / med, unit=unit,
                         peak=None if peak is None else peak + state_bytes(m, opts[name]),
                         note=(f"tuned in {tune_s:.1f} s: {', '.join(choices) or 'nothing to tune'}"
                               if name == "blockdsl:tuned" else "")))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default=",".join(SPECS))
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=6, help="timed steps per contender")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print("command: " + " ".join([Path(sys.executable).name] + sys.argv))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"batch {args.batch}, median of {args.rounds} steps per contender after a warm-up step; "
          "ratios are against contenders timed in the same rounds")
    summary = []
    for spec in args.specs.split(","):
        for precision in args.precisions.split(","):
            print(f"\n{spec} [{precision}]")
            rows = run_spec(spec, precision, args, device)
            by = {r["who"]: r for r in rows}
            base = by["blockdsl:untuned"]["rate"]
            xts = [r for r in rows if r["who"].startswith("x-transformers")]
            best_xt = max(xts, key=lambda r: r["rate"]) if xts else None
            for r in rows:
                peak = "n/a" if r["peak"] is None else f"{r['peak'] / 2**20:7.1f} MiB"
                rel = f"x{r['rate'] / base:5.2f} untuned"
                if best_xt:
                    rel += f"  x{r['rate'] / best_xt['rate']:5.2f} best x-transformers"
                print(f"  {r['who']:<22} {r['rate']:9.0f} {r['unit']}/s  peak {peak}  {rel}  {r['note']}")
            tuned = by["blockdsl:tuned"]["rate"]
            summary.append((spec, precision, tuned, tuned / base, by["blockdsl:reference"]["rate"],
                            best_xt and tuned / best_xt["rate"], best_xt and best_xt["rate"]))
    print("\nsummary: blockdsl tuned, as a ratio to untuned, to the reference kernels and to the best "
          "x-transformers configuration (same precision setting)")
    for spec, precision, tuned, vs_untuned, ref, vs_xt, _ in summary:
        line = (f"  {spec:<32} {precision:<12} {tuned:9.0f}/s  x{vs_untuned:4.2f} untuned  "
                f"x{tuned / ref:4.2f} reference")
        if vs_xt:
            line += f"  x{vs_xt:4.2f} x-transformers ({'meets' if vs_xt >= TARGET else 'misses'} {TARGET}x)"
        print(line)
    xt_by = {(s, p): x for s, p, *_, x in summary if x}
    bd_by = {(s, p): t for s, p, t, *_ in summary}
    for s in {s for s, _ in xt_by}:
        if (s, "fp32") in xt_by and (s, "fp32-medium") in bd_by:
            print(f"  fp32 class, {s}: blockdsl tuned fp32-medium (fp32 via oneDNN) is "
                  f"x{bd_by[(s, 'fp32-medium')] / xt_by[(s, 'fp32')]:.2f} x-transformers in plain fp32 "
                  "(different runs of the same process: indicative)")


if __name__ == "__main__":
    main()
