"""Lowering: norm placements, sharing as module reuse, tuned implementation choices."""

from __future__ import annotations

import json

import torch
from torch import nn

import blockdsl
from blockdsl.nn.model import Residual
from blockdsl.nn.output import ModelOutput

TINY = """
model m {
  d = 16
  stem tokens(vocab=32, context=8, pos=rope)
  head lm(tie=true)
  norm rmsnorm()
  block b {
    attn mha(heads=2, bias=false) norm=PLACEMENT
    ffn  mlp(d_ff=32)             norm=PLACEMENT
  }
  repeat 2 b
}
"""


class _Lin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(4, 4)
        self.seen_norm: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, x_norm: torch.Tensor | None = None) -> torch.Tensor:
        self.seen_norm = x_norm
        return self.w(x)


def test_residual_placements_match_their_formulas() -> None:
    torch.manual_seed(0)
    f = _Lin()
    n1, n2 = nn.LayerNorm(4), nn.LayerNorm(4)
    with torch.no_grad():
        n1.weight.uniform_(0.5, 1.5)
        n2.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 4)
    assert torch.allclose(Residual(f, "pre", [n1])(x), x + f(n1(x)))
    assert torch.allclose(Residual(f, "post", [n1])(x), n1(x + f(x)))
    assert torch.allclose(Residual(f, "sandwich", [n1, n2])(x), x + n2(f(n1(x))))
    assert torch.allclose(Residual(f, "none", [])(x), x + f(x))
    out = Residual(f, "peri", [n1])(x)
    seen = f.seen_norm
    # peri: the primitive reads raw x for its values and gets N(x) for its score path
    assert seen is not None and torch.allclose(seen, n1(x))
    assert torch.allclose(out, x + f(x))


def test_every_placement_builds_and_counts() -> None:
    for placement in ("pre", "post", "sandwich", "peri", "none"):
        text = TINY.replace("PLACEMENT", placement)
        rep = blockdsl.report(text)
        model = blockdsl.build(text, device="cpu")
        assert rep.stored_params == sum(p.numel() for p in model.parameters()), placement
        out = model(torch.randint(0, 32, (2, 8)))
        assert isinstance(out, ModelOutput)
        assert out.logits.shape == (2, 8, 32)
        n_norm_layers = {"pre": 4, "post": 4, "sandwich": 8, "peri": 2, "none": 0}[placement]
        # rmsnorm: d parameters each, plus the final norm
        assert rep.breakdown["norms"] == 16 * n_norm_layers


def test_shared_attention_is_one_module_with_individual_norms() -> None:
    text = TINY.replace("norm=PLACEMENT\n    ffn", "norm=pre share=att\n    ffn").replace(
        "PLACEMENT", "pre"
    )
    model = blockdsl.build(text, device="cpu")
    a0 = model.units[0][0]
    a1 = model.units[1][0]
    assert a0.fn is a1.fn
    assert a0.norms[0] is not a1.norms[0]
    assert model.units[0][1].fn is not model.units[1][1].fn


def test_tuned_choice_is_cached_and_used_by_lowering(tmp_path, monkeypatch) -> None:
    from blockdsl.tune import lookup, tune_plan

    monkeypatch.setenv("BLOCKDSL_CACHE", str(tmp_path))
    plan = blockdsl.resolve(TINY.replace("PLACEMENT", "pre"))
    dec = tune_plan(plan, device="cpu", precision="fp32", verbose=False)
    assert len(dec) == 1  # two attention layers, one shape
    (rec,) = dec.values()
    assert set(rec["candidates"]) == {"sdpa", "bmm", "manual"}
    assert all(r["ok"] for r in rec["candidates"].values())
    assert rec["choice"] in ("sdpa", "bmm", "manual")
    assert (tmp_path / "tune.json").exists()
    attn = plan.layers[0]
    assert lookup(attn, plan.d, plan.seq, "fp32", torch.device("cpu")) == rec["choice"]
    model = blockdsl.build(plan, device="cpu")
    assert model.units[0][0].fn.impl == rec["choice"]
    # An explicit impl in the spec overrides the cache.
    explicit = TINY.replace("mha(heads=2, bias=false)", "mha(heads=2, bias=false, impl=manual)")
    model = blockdsl.build(explicit.replace("PLACEMENT", "pre"), device="cpu")
    assert model.units[0][0].fn.impl == "manual"
    bmm = explicit.replace("impl=manual", "impl=bmm").replace("PLACEMENT", "pre")
    model = blockdsl.build(bmm, device="cpu")
    assert model.units[0][0].fn.impl == "bmm"
    monkeypatch.setenv("BLOCKDSL_TUNE", "off")
    assert lookup(attn, plan.d, plan.seq, "fp32", torch.device("cpu")) is None


def test_default_attention_rule() -> None:
    from blockdsl.lower import attention_impl

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_impl("manual", cpu, "bf16", 128) == "manual"  # explicit wins
    assert attention_impl("auto", cpu, "fp32", 128) == "sdpa"
    assert attention_impl("auto", cpu, "bf16", 256) == "bmm"
    assert attention_impl("auto", cpu, "fp32-medium", 256) == "bmm"
    assert attention_impl("auto", cpu, "bf16", 2048) == "sdpa"
    assert attention_impl("auto", cuda, "bf16", 256) == "sdpa"


def test_tuning_runs_are_kept_per_token_count(tmp_path, monkeypatch) -> None:
    from blockdsl.tune import lookup, tune_plan

    monkeypatch.setenv("BLOCKDSL_CACHE", str(tmp_path))
    plan = blockdsl.resolve(TINY.replace("PLACEMENT", "pre"))
    (small,) = tune_plan(plan, device="cpu", precision="fp32", verbose=False, batch=1).values()
    (large,) = tune_plan(plan, device="cpu", precision="fp32", verbose=False, batch=64).values()
    assert (small["tokens"], large["tokens"]) == (plan.seq, 64 * plan.seq)
    attn, cpu = plan.layers[0], torch.device("cpu")
    assert lookup(attn, plan.d, plan.seq, "fp32", cpu, tokens=2 * plan.seq) == small["choice"]
    assert lookup(attn, plan.d, plan.seq, "fp32", cpu, tokens=40 * plan.seq) == large["choice"]
    assert lookup(attn, plan.d, plan.seq, "fp32", cpu) == large["choice"]  # the latest run
    # Make the two runs disagree, so the nearest-token rule is what picks.
    cache = json.loads((tmp_path / "tune.json").read_text())
    (rec,) = cache.values()
    rec["by_tokens"][str(plan.seq)]["choice"] = "manual"
    rec["by_tokens"][str(64 * plan.seq)]["choice"] = "bmm"
    (tmp_path / "tune.json").write_text(json.dumps(cache))
    assert lookup(attn, plan.d, plan.seq, "fp32", cpu, tokens=3 * plan.seq) == "manual"
    assert lookup(attn, plan.d, plan.seq, "fp32", cpu, tokens=20 * plan.seq) == "bmm"
    from blockdsl.lower import build_from_plan

    assert build_from_plan(plan, device="cpu", batch=1).units[0][0].fn.impl == "manual"
    assert build_from_plan(plan, device="cpu", batch=128).units[0][0].fn.impl == "bmm"


def test_whole_model_check_reverts_layer_winners_that_lose(tmp_path, monkeypatch) -> None:
    from blockdsl import tune

    monkeypatch.setenv("BLOCKDSL_CACHE", str(tmp_path))
    plan = blockdsl.resolve(TINY.replace("PLACEMENT", "pre"))
    cpu = torch.device("cpu")
    # The real race: both variants build, train a step, and get a time.
    key = tune.shape_key(plan.layers[0], plan.d, plan.seq, "fp32", cpu)
    chk = tune.whole_model_check(plan, {key: "manual"}, cpu, "fp32", batch=2, rounds=1)
    assert chk["tuned_s"] > 0 and chk["default_s"] > 0 and chk["batch"] == 2

    def fake_layer(layer, plan, device, precision, tokens):
        return {"choice": "manual", "tokens": tokens, "precision": precision,
                "candidates": {"manual": {"ok": True, "seconds": 1e-3, "error": 0.0}}}

    monkeypatch.setattr(tune, "tune_layer", fake_layer)
    for tuned_s, kept in ((2.0, False), (1.0, True)):
        monkeypatch.setattr(tune, "whole_model_check",
                            lambda *a, t=tuned_s, **k: {"tuned_s": t, "default_s": 1.0, "batch": 2})
        (rec,) = tune.tune_plan(plan, device="cpu", precision="fp32", verbose=False, batch=2).values()
        assert rec["default"] == "sdpa"
        assert rec["whole_model"]["kept"] is kept
        assert rec["choice"] == ("manual" if kept else "sdpa")
        assert tune.lookup(plan.layers[0], plan.d, plan.seq, "fp32", cpu) == rec["choice"]


def test_with_impls_sets_auto_arguments_and_keeps_explicit_ones() -> None:
    from blockdsl.tune import shape_key, with_impls

    text = TINY.replace("PLACEMENT", "pre").replace("repeat 2 b", "repeat 2 b { at 1: attn.impl = manual }")
    plan = blockdsl.resolve(text)
    attn = [la for la in plan.layers if la.prim == "mha"]
    # Same shape key: the explicit layer must not be taken by a choice made for the auto one.
    cpu = torch.device("cpu")
    keys = {shape_key(la, plan.d, plan.seq, "fp32", cpu) for la in attn}
    assert len(attn) == 2 and len(keys) == 1
    out = with_impls(plan, lambda layer: "bmm" if layer.prim == "mha" else None)
    impls = [la.args["impl"] for la in out.layers if la.prim == "mha"]
    assert impls == ["bmm", "manual"]
    mlp_args = [[la.args for la in p.layers if la.prim == "mlp"] for p in (plan, out)]
    assert mlp_args[0] == mlp_args[1]


def test_every_shipped_lowering_passes_every_module_argument() -> None:
    """The schema's defaults are the only ones a spec reaches: each registry entry passes
    every keyword of its module's constructor (register() checks the other direction: every
    schema argument is passed), so a module default is never silently used."""
    import inspect

    from blockdsl.primitives import PRIMITIVES

    for name, prim in PRIMITIVES.items():
        low = prim.lowering
        params = inspect.signature(low.module_class()).parameters
        passed = set(low.kwargs.values()) | set(low.env)
        assert passed == set(params), (name, set(params) ^ passed)


def test_model_io_is_the_plans_task_shape() -> None:
    from pathlib import Path

    from blockdsl.taskio import TaskIO

    lm = blockdsl.build(TINY.replace("PLACEMENT", "pre"), device="cpu")
    assert lm.io == TaskIO("lm", seq=8, vocab=32, width=16, name="m")
    vit = blockdsl.resolve(Path(__file__).parent.parent / "specs/tiny/vit.block")
    io = blockdsl.build(vit, device="cpu").io
    stem, head = vit.stem[1], vit.head[1]
    assert io == TaskIO("classify", seq=vit.seq, image_size=stem["image"],
                        channels=stem["channels"], classes=head["classes"], width=vit.d,
                        patch=stem["patch"], name=vit.name)
    assert io == vit.io
