"""graph.svg: the legend, the per-box parameters, norm placement, expert counts and
readable FLOPs, read back from the file `blockdsl compile` writes."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

import blockdsl
from blockdsl.cli import main
from blockdsl.picture import flops_text, si

ROOT = Path(__file__).resolve().parent.parent
NS = "{http://www.w3.org/2000/svg}"


def compile_svg(spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Run `blockdsl compile SPEC --out tmp/<model>` and return every text element of graph.svg."""
    name = blockdsl.report(spec).name
    rc = main(["compile", str(spec), "--out", str(tmp_path / name)])  # --out is the folder itself
    _, err = capsys.readouterr()
    assert rc == 0, err
    root = ET.parse(tmp_path / name / "graph.svg").getroot()  # well-formed XML, or this raises
    return ["".join(t.itertext()) for t in root.iter(f"{NS}text")]


def test_si_and_flops_units() -> None:
    assert si(12345) == "12.3K"
    assert si(999) == "999"
    assert si(64) == "64"
    assert si(999_950) == "1.00M"  # rounds up into the next unit, never "1000K"
    assert si(2_363_904) == "2.36M"
    assert si(44_300_000_000) == "44.3G"
    assert flops_text(5.32e6) == "5.32 MFLOP"
    assert flops_text(97.4e6) == "97.4 MFLOP"
    assert flops_text(512) == "512 FLOP"


def test_moeut_svg_legend_experts_params_sharing(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    spec = ROOT / "specs" / "moeut.block"
    texts = compile_svg(spec, tmp_path, capsys)
    rep = blockdsl.report(spec)
    joined = "\n".join(texts)
    # the colour legend names every family, saying which are absent
    assert "attention" in texts and "routed FFN (MoE)" in texts
    assert "dense FFN (none here)" in texts
    # 16 layers of each kind: expert count and k in every routed box
    counts = Counter(texts)
    assert counts["155 exp, k=12"] == 16 and counts["8 exp, k=2"] == 16
    # peri-LayerNorm on every sublayer
    assert counts["peri LN"] == 32
    # parameters: each group's first use shows its count, later uses say "shared"
    owners = [r for r in rep.rows if r.owner]
    assert len(owners) == 4 and counts["shared"] == 32 - 4
    for r in owners:
        assert si(r.params) in texts
    assert "16.4M" in texts  # one sigma-MoE layer: 155 experts x 2 x 412 x 128 + its norm
    # the sharing tags say how often each group is applied (G=2, ABAB, 16 layers)
    assert sum(t.endswith("used ×8") for t in texts) == 4
    # readable FLOPs: per box and in the totals line, never the old `5.32MF`
    assert counts["3.02 MFLOP"] == 16
    assert f"{flops_text(rep.flops_per_token)}/token" in joined
    assert "MF<" not in (tmp_path / rep.name / "graph.svg").read_text()


def test_params_column_sums_to_stored_total(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Every stored parameter appears once in the picture: stem + owner rows + final norm
    and head (+ AltUp's mixing coefficients) == the report's stored total."""
    spec = ROOT / "specs" / "tiny" / "altup.block"
    texts = compile_svg(spec, tmp_path, capsys)
    rep = blockdsl.report(spec)
    bd = rep.breakdown
    parts = [bd["stem"], bd["head"] + bd["final_norm"], bd["altup"]]
    parts += [r.params for r in rep.rows if r.owner]
    assert sum(parts) == rep.stored_params
    for n in parts[:2] + parts[3:]:
        assert si(n) in texts
    assert any(t.startswith("AltUp K=2 (recycled") and t.endswith(f"{bd['altup']} mixing params")
               for t in texts)
    assert Counter(texts)["pre RMS"] == rep.layers
    assert "final RMS → head (lm, tied)" in texts


def test_norm_placements_and_expert_choice(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "norms.block"
    spec.write_text(
        "model norms {\n"
        "  d = 64\n"
        "  stem tokens(vocab=256, context=32, pos=rope)\n"
        "  head lm(tie=true)\n"
        "  block b {\n"
        "    attn mha(heads=4) norm=sandwich(rmsnorm)\n"
        "    ffn  expert_choice(experts=8, capacity_factor=1.5, d_ff=64, group=position) norm=post\n"
        "    ffn2 topk(experts=6, k=3, d_ff=32) norm=none\n"
        "  }\n"
        "  repeat 2 b\n"
        "}\n"
    )
    texts = compile_svg(spec, tmp_path / "out", capsys)
    counts = Counter(texts)
    assert counts["sandwich RMS x2"] == 2
    assert counts["post LN"] == 2
    assert counts["none"] == 2
    assert counts["8 exp, cf=1.5"] == 2
    assert counts["6 exp, k=3"] == 2
    assert "shared" not in texts  # nothing shared: every box counts its own parameters


def test_shared_group_with_own_norms_still_sums(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """ALBERT-style: one FFN for every layer, each use with a LayerNorm of its own (64
    parameters at d 32): the later uses say `shared +64`, and the column still adds up."""
    spec = ROOT / "tests" / "specs" / "shared_ffn.block"
    texts = compile_svg(spec, tmp_path, capsys)
    rep = blockdsl.report(spec)
    bd = rep.breakdown
    assert Counter(texts)["shared +64"] == 2
    assert "ffn used ×3" in texts
    shown = [bd["stem"], bd["head"] + bd["final_norm"]] + [r.params for r in rep.rows]
    assert sum(shown) == rep.stored_params
