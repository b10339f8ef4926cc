"""Adding a primitive touches one place: this file alone defines a squared-ReLU FFN.

Its module and its registry entry live here, registered through the public registry API
and removed after each test. A spec that uses it then checks, compiles with exact
parameter counts, trains, shows in the report and the picture, and is a slot choice a
search trains, with no other file touched. A variant whose entry names a tunable
argument is tuned by `compile --tune`'s `tune_plan`, and lowering uses its decision.
Everything runs in-process: a CLI subprocess would not see a primitive this test
registered.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import blockdsl
from blockdsl import primitives as P
from blockdsl.cli import main
from blockdsl.picture import to_svg


class SquaredReLUFFN(nn.Module):
    """w_out(relu(w_in x)^2) (So et al. 2021, Primer): d*f + f*d weights, f + d biases."""

    def __init__(self, d: int, d_ff: int, bias: bool) -> None:
        super().__init__()
        self.w_in = nn.Linear(d, d_ff, bias=bias)
        self.w_out = nn.Linear(d_ff, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(F.relu(self.w_in(x)).square())


def _params(ctx: P.Ctx, a: dict[str, Any]) -> int:
    d, f, b = ctx.d, a["d_ff"], a["bias"]
    return 2 * d * f + (f + d if b else 0)


def _check(ctx: P.Ctx, a: dict[str, Any]) -> None:
    if a["d_ff"] <= 0:
        raise P.ArgError(f"d_ff={a['d_ff']} must be positive", "d_ff")


SQRELU = P.Primitive(
    "sqrelu",
    "ffn",
    {"d_ff": P.ArgSpec("int", lambda ctx, a: 4 * ctx.d), "bias": P.ArgSpec("bool", True)},
    _check,
    _params,
    lambda ctx, a: float(_params(ctx, a)),
    lambda ctx, a: 4.0 * ctx.d * a["d_ff"],
    "squared-ReLU feed-forward (Primer)",
    lowering=P.Lowering(SquaredReLUFFN, {"d_ff": "d_ff", "bias": "bias"}),
)

SPEC = """
model sq {
  d = 32
  block cell {
    a mha(heads=2, bias=false) norm=pre
    f sqrelu(d_ff=48)          norm=pre
  }
  repeat 2 cell
  stem tokens(vocab=256, context=32, pos=learned)
  head lm(tie=true)
}
"""

SPACE = SPEC + """
model dense extends sq {  # the same model with a dense FFN: the baseline
  block cell {
    a mha(heads=2, bias=false)             norm=pre
    f mlp(d_ff=64, act=gelu, bias=false)   norm=pre
  }
}
space ext extends dense {
  block cell {
    a mha(heads=2, bias=false) norm=pre
    f { mlp(d_ff=64, act=gelu, bias=false) | sqrelu(d_ff=64, bias=false) } norm=pre
  }
  baseline dense
  minimize val_loss
  budget search(trials=2, seconds=1, batch_size=8, eval_batches=2, prune_startup=2, heartbeat=1)
}
"""


@pytest.fixture(autouse=True)
def sqrelu() -> Iterator[P.Primitive]:
    P.register(SQRELU)
    try:
        yield SQRELU
    finally:
        P.unregister("sqrelu")


def _spec(tmp_path: Path, text: str = SPEC, name: str = "sq.block") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_a_registered_primitive_checks_and_compiles_with_exact_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _spec(tmp_path)
    assert main(["check", str(path)]) == 0
    capsys.readouterr()
    rep = blockdsl.report(path)
    torch.manual_seed(0)
    model = blockdsl.build(path, device="cpu")
    assert sum(p.numel() for p in model.parameters()) == rep.stored_params
    ffns = [r for r in model.units[0]][1:] + [r for r in model.units[1]][1:]
    assert all(isinstance(r.fn, SquaredReLUFFN) for r in ffns)
    for row in (r for r in rep.rows if r.prim == "sqrelu"):
        # each row owns its FFN and one pre-norm LayerNorm (2·d)
        assert row.params == 2 * 32 * 48 + 48 + 32 + 2 * 32
    assert rep.breakdown["ffn"] == 2 * (2 * 32 * 48 + 48 + 32)
    out = tmp_path / "art"
    assert main(["compile", str(path), "--out", str(out), "--smoke", "--json",
                 "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["smoke"]["finite"] and not summary["smoke"]["params_without_grad"]
    assert summary["smoke"]["module_params"] == summary["stored_params"] == rep.stored_params
    assert [r["prim"] for r in summary["rows"]] == ["mha", "sqrelu"] * 2


def test_a_registered_primitive_trains(tmp_path: Path) -> None:
    from blockdsl.train import TrainConfig, seed_everything, train

    seed_everything(0)
    model = blockdsl.build(_spec(tmp_path), device="cpu", precision="fp32")
    before = [p.detach().clone() for p in model.parameters()]
    res = train(model, TrainConfig(steps=4, batch_size=8, eval_every=2, eval_batches=1,
                                   precision="fp32", quiet=True, warmup=1))
    assert len(res.losses) == 4 and all(v == v for v in res.losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_registered_primitive_shows_in_the_report_and_picture(tmp_path: Path) -> None:
    plan = blockdsl.resolve(_spec(tmp_path))
    rep = blockdsl.report(plan)
    rows = [r for r in rep.rows if r.prim == "sqrelu"]
    assert len(rows) == 2 and all(r.flops == 4.0 * 32 * 48 for r in rows)
    assert all(layer.family == "ffn" for layer in plan.layers if layer.prim == "sqrelu")
    svg = to_svg(rep, plan=plan)
    assert svg.count(": sqrelu</text>") == 2
    assert svg.count(f'fill="{P.FAMILIES["ffn"].colour}" stroke="#333"/>') >= 3  # legend + 2


def test_a_registered_primitive_is_a_slot_choice_a_search_trains(tmp_path: Path) -> None:
    from blockdsl import search as S

    S.quiet_optuna()
    study = S.search(_spec(tmp_path, SPACE, "ext.block"), study="ext", root=tmp_path,
                     steps=3, baseline_steps=3, threads=1)
    trials = study.get_trials()
    assert len(trials) == 2
    assert trials[0].user_attrs["role"] == "baseline"
    swapped = trials[1]  # the start design: the baseline's one neighbour, the sqrelu FFN
    assert swapped.params == {"cell.f": "sqrelu"}
    assert swapped.user_attrs["status"] == "trained", swapped.user_attrs
    assert swapped.user_attrs["arch"] == "d=32 (mha sqrelu)x2"


def test_register_rejects_entries_that_would_fail_later() -> None:
    with pytest.raises(ValueError, match="already registered"):
        P.register(SQRELU)
    partial = P.Lowering(SquaredReLUFFN, {"d_ff": "d_ff"})  # bias would take a module default
    with pytest.raises(ValueError, match="does not pass bias"):
        P.register(replace(SQRELU, name="sq2", lowering=partial))
    with pytest.raises(ValueError, match="unknown family 'conv'"):
        P.register(replace(SQRELU, name="sq3", family="conv"))
    assert "sq2" not in P.PRIMITIVES and "sq3" not in P.PRIMITIVES


def test_a_family_no_one_registered_is_drawn_as_other(tmp_path: Path) -> None:
    plan = blockdsl.resolve(_spec(tmp_path))
    layers = tuple(replace(la, family="conv") if la.prim == "sqrelu" else la
                   for la in plan.layers)
    odd = replace(plan, layers=layers)
    rep = blockdsl.report(odd)
    assert rep.breakdown["conv"] == 2 * (2 * 32 * 48 + 48 + 32) and rep.breakdown["ffn"] == 0
    svg = to_svg(rep, plan=odd)
    assert ">other</text>" in svg and svg.count('fill="#dddddd" stroke="#333"/>') == 3


class TunableSquaredReLUFFN(SquaredReLUFFN):
    """The same FFN with two implementations of relu(h)^2: "plain" squares, "mul"
    multiplies relu(h) by itself, and "wrong" forgets the square (a candidate the
    tuner's check against the reference must reject)."""

    def __init__(self, d: int, d_ff: int, bias: bool, impl: str) -> None:
        super().__init__(d, d_ff, bias)
        self.impl = impl

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.w_in(x))
        if self.impl == "plain":
            h = h.square()
        elif self.impl == "mul":
            h = h * h
        return self.w_out(h)


def _impl_default(a: dict[str, Any], env: P.BuildEnv) -> str:
    return "plain"  # the rule with no measurement


SQRELU_TUNED = replace(
    SQRELU,
    name="sqrelu_t",
    args={**SQRELU.args, "impl": P.ArgSpec("enum", "auto", ("auto", "plain", "mul", "wrong"))},
    lowering=P.Lowering(
        TunableSquaredReLUFFN, {"d_ff": "d_ff", "bias": "bias", "impl": "impl"},
        prepare=lambda a, env: {**a, "impl": _impl_default(a, env) if a["impl"] == "auto"
                                else a["impl"]},
    ),
    tunable=P.Tunable("impl", ("plain", "mul", "wrong"), "plain", _impl_default),
)


def test_a_registered_primitive_with_a_tunable_argument_is_tuned_and_lowered_with_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blockdsl.tune import TOLERANCE, lookup, tune_plan

    monkeypatch.setenv("BLOCKDSL_CACHE", str(tmp_path))
    P.register(SQRELU_TUNED)
    try:
        # attention's kernel is fixed, so the one tuned shape is the new primitive's
        spec = SPEC.replace("sqrelu(d_ff=48)", "sqrelu_t(d_ff=48)").replace(
            "mha(heads=2, bias=false)", "mha(heads=2, bias=false, impl=manual)")
        plan = blockdsl.resolve(_spec(tmp_path, spec))
        dec = tune_plan(plan, device="cpu", precision="fp32", verbose=False, batch=1,
                        whole_model=False)
        (rec,) = dec.values()  # two layers, one shape
        cands = rec["candidates"]
        assert rec["default"] == "plain" and "whole_model" not in rec
        # both correct implementations were checked against the reference and timed ...
        for impl in ("plain", "mul"):
            assert cands[impl]["ok"] and cands[impl]["error"] <= TOLERANCE["fp32"]
            assert cands[impl]["seconds"] > 0
        # ... and the one that differs from it was rejected, never timed or chosen
        assert not cands["wrong"]["ok"] and "differs from plain" in cands["wrong"]["why"]
        assert "seconds" not in cands["wrong"] and rec["choice"] in ("plain", "mul")

        cpu = torch.device("cpu")
        layer = next(la for la in plan.layers if la.prim == "sqrelu_t")
        assert lookup(layer, plan.d, plan.seq, "fp32", cpu) == rec["choice"]

        def impls() -> set[str]:
            model = blockdsl.build(plan, device="cpu")
            return {r.fn.impl for unit in model.units for r in unit
                    if isinstance(r.fn, TunableSquaredReLUFFN)}

        assert impls() == {rec["choice"]}
        # Whichever won, lowering follows the cache: recorded the other way, it builds that.
        other = {"plain": "mul", "mul": "plain"}[rec["choice"]]
        cache = json.loads((tmp_path / "tune.json").read_text())
        for run in cache.values():
            run["choice"] = other
            for by in run["by_tokens"].values():
                by["choice"] = other
        path = tmp_path / "tune.json"
        mtime = path.stat().st_mtime_ns
        path.write_text(json.dumps(cache))
        os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # the cache re-reads on a new mtime
        assert impls() == {other}
        monkeypatch.setenv("BLOCKDSL_TUNE", "off")  # no cache: the entry's default rule
        assert impls() == {"plain"}
    finally:
        P.unregister("sqrelu_t")
