"""Errors are part of the language.

Every malformed or inconsistent spec exits non-zero from the CLI with
`file:line:col: error: ...`, the offending line, a caret under the offending text and a
`hint:` line, and never a traceback. Each case below names the text the error must point
at; its line:col is computed from the spec text, so the assertion is exact.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import blockdsl
from blockdsl.cli import main

ROOT = Path(__file__).resolve().parent.parent

HEADER = """# a spec with one mistake
d = 64
model m {
  stem tokens(vocab=100, context=16)
  head lm()
"""


def spec(body: str, header: str = HEADER) -> str:
    return header + body + "\n}\n"


def layer(sub: str, repeat: str = "repeat 2 layer") -> str:
    return spec(f"  block layer {{\n    {sub}\n  }}\n  {repeat}")


# --------------------------------------------------------------------------- helpers


def loc(text: str, needle: str, nth: int = 1) -> tuple[int, int]:
    """1-based line and column of the nth occurrence of needle."""
    i = -1
    for _ in range(nth):
        i = text.index(needle, i + 1)
    line = text.count("\n", 0, i) + 1
    col = i - (text.rfind("\n", 0, i) + 1) + 1
    return line, col


@dataclass
class Err:
    """What one error must look like."""

    needle: str  # the offending text (first occurrence unless nth)
    words: tuple[str, ...]  # key words of the message, case-insensitive
    hint: tuple[str, ...] = ()  # key words of the hint
    nth: int = 1
    skip: int = 0  # the error points this many characters into the needle
    file: str | None = None  # the file the error points into (default: the checked one)
    files: dict[str, str] = field(default_factory=dict)  # extra files next to it


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def run_cli(*argv: str) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "blockdsl.cli", *argv], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    return p.returncode, p.stdout, p.stderr


def assert_located(stderr: str, path: Path | str, text: str, e: Err) -> None:
    assert "Traceback" not in stderr
    line, col = loc(text, e.needle, e.nth)
    col += e.skip
    lines = stderr.rstrip("\n").splitlines()
    head = lines[0]
    m = re.match(r"^(?P<file>.+):(?P<line>\d+):(?P<col>\d+): error: (?P<msg>.+)$", head)
    assert m, f"not file:line:col: error: ...: {head!r}"
    assert m["file"] == str(path)
    assert (int(m["line"]), int(m["col"])) == (line, col), head
    for w in e.words:
        assert w.lower() in m["msg"].lower(), (w, head)
    # the source line, then a caret under the offending text
    src_line = text.splitlines()[line - 1]
    assert lines[1].endswith("| " + src_line), lines[1]
    caret = lines[2]
    bar = caret.index("| ")
    marks = caret[bar + 2:]
    assert marks.lstrip(" ").startswith("^") and set(marks.strip()) == {"^"}, caret
    start = len(marks) - len(marks.lstrip(" "))
    assert start == col - 1, caret
    marked = src_line[start:start + len(marks.strip())]
    assert marked.startswith(e.needle[e.skip:][: len(marked)]), (marked, e.needle)
    hints = [x for x in lines[3:] if x.startswith("  hint: ")]
    assert hints, f"no hint line in:\n{stderr}"
    for w in e.hint:
        assert w.lower() in hints[0].lower(), (w, hints[0])


def check_case(tmp_path: Path, text: str, e: Err, capsys: pytest.CaptureFixture[str]) -> None:
    for name, body in e.files.items():
        (tmp_path / name).write_text(body, encoding="utf-8")
    path = tmp_path / "bad.block"
    path.write_text(text, encoding="utf-8")
    rc, out, err = run_main(capsys, "check", str(path))
    assert rc == 1, (out, err)
    assert not out.strip().startswith("ok")
    target = tmp_path / e.file if e.file else path
    pointed_text = (e.files.get(e.file) if e.file else text) or ""
    assert_located(err, target.resolve() if e.file else target, pointed_text, e)
    # the library raises the same located error
    with pytest.raises(blockdsl.BlockError) as info:
        blockdsl.check(path)
    assert info.value.span is not None and info.value.hint


# --------------------------------------------------------------------------- the cases

CASES = [
    # ---- syntax
    pytest.param(layer("attn mha(heads=4 }"),
                 Err("}", ("unexpected", "'}'"), ("expected", "')'"), nth=1), id="syntax-unclosed-call"),
    pytest.param(spec("  block layer { ffn mlp() } $\n  repeat 2 layer"),
                 Err("$", ("unexpected character", "'$'"), ("expected",)), id="syntax-bad-character"),
    pytest.param(spec("  block layer { ffn mlp() }\n  repeat 2 layer ="),
                 Err("layer =", ("unexpected", "'='"), ("expected",), skip=6), id="syntax-stray-token"),
    # ---- names
    pytest.param(layer("attn mhaa(heads=4)"),
                 Err("mhaa(heads=4)", ("unknown primitive", "'mhaa'"), ("did you mean", "'mha'")),
                 id="unknown-primitive"),
    pytest.param(layer("attn mha(heads=4, hedz=2)"),
                 Err("hedz=2", ("has no argument", "'hedz'"), ("'heads'",)), id="unknown-argument"),
    pytest.param(spec("  block layer { ffn mlp() }\n  repeat 2 layr"),
                 Err("layr", ("unknown block", "'layr'"), ("did you mean", "'layer'")),
                 id="unknown-block"),
    pytest.param(layer("ffn mlp(d_ff=4*dd)"),
                 Err("dd)", ("unknown variable", "'dd'"), ("did you mean", "'d'")),
                 id="unknown-variable-in-expression"),
    pytest.param(layer("ffn mlp(d_ff=width)"),
                 Err("d_ff=width", ("unknown variable", "'width'"), ("d",)),
                 id="unknown-variable-as-argument"),
    pytest.param(layer("ffn mlp(act=gelux)"),
                 Err("act=gelux", ("'act'", "must be one of", "gelux"), ("did you mean", "'gelu'")),
                 id="unknown-enum-value"),
    pytest.param(layer("ffn mlp() norm=prex"),
                 Err("norm=prex", ("unknown norm placement", "'prex'"), ("'pre'",)),
                 id="unknown-norm-placement"),
    pytest.param(layer("ffn mlp() norm=pre(batchnorm)"),
                 Err("norm=pre(batchnorm)", ("unknown norm kind", "'batchnorm'"), ("rmsnorm",)),
                 id="unknown-norm-kind"),
    pytest.param(spec("  block layer { ffn mlp() }\n  repeat 2 layer { at 0: ffn.dff = 3 }"),
                 Err("at 0: ffn.dff", ("no argument", "'dff'"), ("'d_ff'",)), id="unknown-override-argument"),
    pytest.param(spec("  block layer { ffn mlp() }\n  repeat 2 layer { at 0: attn.heads = 3 }"),
                 Err("at 0: attn", ("no sublayer", "'attn'"), ("ffn",)), id="unknown-override-target"),
    pytest.param(spec("  block layer { ffn mlp(d_ff=mx(3, 4)) }\n  repeat 2 layer"),
                 Err("mx(3, 4)", ("unknown function", "'mx'"), ("'max'",)), id="unknown-function"),
    # ---- types and values
    pytest.param(layer("attn mha(heads=4, bias=3)"),
                 Err("bias=3", ("'bias'", "true or false", "3")), id="wrong-type-bool"),
    pytest.param(layer("attn mha(heads=2.5)"),
                 Err("heads=2.5", ("'heads'", "an integer", "2.5")), id="wrong-type-int"),
    pytest.param(layer("attn mha(heads=5)"),
                 Err("heads=5", ("heads=5", "does not divide", "d=64"), ("divisors of 64", "head_dim")),
                 id="heads-do-not-divide-d"),
    pytest.param(layer("attn mha(heads=4, kv_heads=3)"),
                 Err("kv_heads=3", ("kv_heads=3", "does not divide", "heads=4"), ("grouped-query",)),
                 id="kv-heads-do-not-divide-heads"),
    pytest.param(spec("  block layer {\n    a mlp(d_ff=32) share=s\n    b mlp(d_ff=64) share=s\n"
                      "  }\n  repeat 2 layer"),
                 Err("mlp(d_ff=64)", ("share=s", "disagree", "d_ff=64", "d_ff=32"),
                     ("same arguments", "share=")), id="sharing-group-shapes-disagree"),
    pytest.param(spec("  block layer { attn mha(heads=4) share=s }\n"
                      "  repeat 2 layer { at 1: attn.heads = 8 }"),
                 Err("mha(heads=4)", ("share=s", "disagree", "heads=8", "heads=4"), ("share=",)),
                 id="sharing-broken-by-override"),
    pytest.param(spec("  block layer { ffn mlp(d_ff=d/0) }\n  repeat 2 layer"),
                 Err("d/0", ("division by zero",)), id="division-by-zero"),
    # ---- repeat and overrides
    pytest.param(spec("  block layer { ffn mlp() }\n  repeat 2 layer { at 5: ffn.d_ff = 8 }"),
                 Err("5: ffn", ("repeat index 5", "out of range"), ("0..1",)), id="repeat-index-too-large"),
    pytest.param(spec("  block layer { ffn mlp() }\n  repeat 2 layer { at -3: ffn.d_ff = 8 }"),
                 Err("-3", ("repeat index -3", "out of range"), ("0..1",)), id="repeat-index-too-negative"),
    pytest.param(spec("  block layer { ffn mlp() }\n  repeat 4 layer { at 0..9: ffn.d_ff = 8 }"),
                 Err("9:", ("repeat index 9", "out of range"), ("0..3",)), id="repeat-range-too-long"),
    pytest.param(spec("  block layer { ffn mlp() }\n  repeat 0 layer"),
                 Err("0 layer", ("repeat count", "positive")), id="repeat-zero"),
    pytest.param(spec("  block layer { ffn mlp() }\n  repeat 2 layer groups=3"),
                 Err("groups=3", ("groups=3", "exceeds", "2"), ("groups",), skip=7),
                 id="groups-exceed-repeat"),
    # ---- MoE and AltUp semantics
    pytest.param(layer("moe topk(experts=4, k=5)"),
                 Err("k=5", ("k=5", "exceeds", "experts=4"), ("at most",)), id="k-exceeds-experts"),
    pytest.param(layer("moe topk(experts=4, k=2, capacity_factor=0)"),
                 Err("capacity_factor=0", ("capacity_factor", "must be positive"), ("none",)),
                 id="capacity-factor-zero"),
    pytest.param(layer("moe topk(experts=4, k=2, capacity_factor=-1.5)"),
                 Err("capacity_factor=-1.5", ("capacity_factor=-1.5", "positive"), ("dropless",)),
                 id="capacity-factor-negative"),
    pytest.param(layer("moe expert_choice(experts=4)"),
                 Err("expert_choice(experts=4)", ("expert-choice", "causal"), ("group=position",)),
                 id="expert-choice-causal-default-group"),
    pytest.param(layer("moe expert_choice(experts=4, group=batch)"),
                 Err("group=batch", ("group=batch", "leaks the future"), ("group=position",)),
                 id="expert-choice-causal-group-batch"),
    pytest.param(spec("  altup altup(k=3)\n  block layer { ffn mlp() }\n  repeat 2 layer"),
                 Err("k=3", ("altup k=3", "exceeds", "2 layers"), ("k <=",)), id="altup-k-exceeds-layers"),
    # ---- model structure
    pytest.param(HEADER.replace("  head lm()\n", "") + "  block layer { ffn mlp() }\n  repeat 1 layer\n}\n",
                 Err("model m", ("has no head",), ("head lm()",)), id="missing-head"),
    pytest.param(spec("  block layer { ffn mlp() }\n  repeat 1 layer").replace(
                 "head lm()", "head classify(classes=3)"),
                 Err("classify(classes=3)", ("head 'classify'", "does not fit", "tokens"), ("head lm",)),
                 id="head-does-not-fit-stem"),
    pytest.param(spec("  block layer { ffn mlp() }\n  repeat 1 layer").replace("stem tokens", "stem tokenz"),
                 Err("tokenz(", ("unknown stem", "'tokenz'"), ("'tokens'",)), id="unknown-stem"),
    pytest.param(spec("  block layer { ffn mlp() }\n  repeat 1 layer") + "model n extends mm {\n  d = 8\n}\n",
                 Err("model n", ("extends unknown model", "'mm'"), ("'m'",)), id="extends-unknown-model"),
    pytest.param(spec("  block layer {\n    ffn mlp()\n    ffn mlp()\n  }\n  repeat 1 layer"),
                 Err("ffn mlp()", ("two sublayers named 'ffn'",), ("unique",), nth=2),
                 id="duplicate-sublayer-label"),
    pytest.param(spec('  pattern "AFX" A=mha(heads=4) F=mlp()'),
                 Err('pattern "AFX"', ("pattern letter 'X'", "not bound"), ("X=",)),
                 id="pattern-letter-unbound"),
    # ---- includes
    pytest.param('include "nothere.block"\n' + spec("  block layer { ffn mlp() }\n  repeat 1 layer"),
                 Err('include "nothere.block"', ("included file not found", "nothere.block"),
                     ("relative to the including file",)), id="missing-included-file"),
    pytest.param('include "b.block"\n' + spec("  block layer { ffn mlp() }\n  repeat 1 layer"),
                 Err('include "bad.block"', ("include cycle", "bad.block -> b.block -> bad.block"),
                     ("itself",), file="b.block", files={"b.block": '# b\ninclude "bad.block"\n'}),
                 id="include-cycle"),
    pytest.param('include "bad.block"\n' + spec("  block layer { ffn mlp() }\n  repeat 1 layer"),
                 Err('include "bad.block"', ("include cycle",), ("itself",)), id="include-self"),
    pytest.param('include "lib.block"\n' + spec("  block layer { ffn mlp(d_ff=f) }\n  repeat 1 layer"),
                 Err("ffff", ("unknown function", "'ffff'"), ("expected one of", "max"),
                     file="lib.block", files={"lib.block": "# a library with an error\nf = ffff(2)\n"}),
                 id="error-inside-included-file"),
]


@pytest.mark.parametrize(("text", "e"), CASES)
def test_error_is_located_with_caret_and_hint(tmp_path: Path, text: str, e: Err,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    check_case(tmp_path, text, e, capsys)


# --------------------------------------------------------------------------- as a subprocess


def test_cli_subprocesses_report_located_errors(tmp_path: Path) -> None:
    """The real command line, three kinds of error, run side by side (each ~1 s to start)."""
    syntax = layer("attn mha(heads=4 }")
    b_text = '\n\ninclude "a.block"  # back to a\n'
    files = {"syntax.block": syntax, "a.block": 'include "b.block"\n', "b.block": b_text}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    argv = {name: str(tmp_path / name) for name in ("syntax.block", "a.block")}
    argv["missing"] = str(tmp_path / "nope.block")
    procs = {k: subprocess.Popen([sys.executable, "-m", "blockdsl.cli", "check", v], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, v in argv.items()}
    res = {k: (p.wait(timeout=60), *p.communicate()) for k, p in procs.items()}
    for rc, out, _ in res.values():
        assert rc == 1 and out == ""
    assert_located(res["syntax.block"][2], tmp_path / "syntax.block", syntax,
                   Err("}", ("unexpected", "'}'"), ("expected",)))
    assert_located(res["a.block"][2], (tmp_path / "b.block").resolve(), b_text,
                   Err('include "a.block"', ("include cycle", "a.block -> b.block -> a.block"),
                       ("itself",)))
    err = res["missing"][2]
    assert "Traceback" not in err
    assert err.startswith("error: no such file:") and "nope.block" in err
    assert "\n  hint: " in err


# --------------------------------------------------------------------------- more CLI paths


def test_compile_reports_the_same_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = layer("attn mha(heads=5)")
    path = tmp_path / "bad.block"
    path.write_text(text, encoding="utf-8")
    rc, out, err = run_main(capsys, "compile", str(path), "--json", "--out", str(tmp_path / "o"))
    assert rc == 1 and out == ""
    assert_located(err, path, text, Err("heads=5", ("does not divide",), ("divisors",)))
    assert not (tmp_path / "o" / "m").exists()  # nothing written for a broken spec


def test_unknown_model_flag(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_main(capsys, "check", str(ROOT / "specs" / "tiny" / "gpt.block"),
                          "--model", "gpt_tiyn")
    assert rc == 1 and "Traceback" not in err
    assert "no model named 'gpt_tiyn'" in err and "hint: did you mean 'gpt_tiny'" in err


def test_missing_file_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_main(capsys, "check", str(tmp_path / "missing.block"))
    assert rc == 1 and out == ""
    assert err.startswith("error: no such file") and "  hint: check the path" in err


def test_folder_as_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_main(capsys, "check", str(tmp_path))
    assert rc == 1 and "Traceback" not in err and "is a folder" in err
    assert "  hint: " in err


def test_allowed_expert_choice_variants() -> None:
    """The causal check rejects only leaks: position grouping, or a non-causal model, pass."""
    blockdsl.check(layer("moe expert_choice(experts=4, group=position)"))
    vit = spec("  block layer { moe expert_choice(experts=4) }\n  repeat 2 layer").replace(
        "tokens(vocab=100, context=16)", "patches(image=8, patch=4)").replace(
        "head lm()", "head classify(classes=3)")
    blockdsl.check(vit)


# --------------------------------------------------------------------------- known gaps


def test_cls_pool_without_class_token_is_a_located_error() -> None:
    text = spec("  block layer { ffn mlp() }\n  repeat 1 layer").replace(
        "tokens(vocab=100, context=16)", "patches(image=8, patch=4, cls=none)").replace(
        "head lm()", "head classify(classes=3)")
    with pytest.raises(blockdsl.BlockError) as info:
        blockdsl.check(text)
    assert info.value.span is not None and info.value.hint


def test_function_overflow_is_a_located_error(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    text = layer("ffn mlp(d_ff=int(1e400))")
    path = tmp_path / "bad.block"
    path.write_text(text, encoding="utf-8")
    rc, _, err = run_main(capsys, "check", str(path))
    assert rc == 1
    assert_located(err, path, text, Err("1e400", ("too large",)))
    text = layer("ffn mlp(d_ff=int(1e300 * 1e300))")
    path.write_text(text, encoding="utf-8")
    rc, _, err = run_main(capsys, "check", str(path))
    assert rc == 1
    assert_located(err, path, text, Err("1e300 * 1e300", ("too large",)))


def test_norm_share_kind_disagreement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = spec("  block layer {\n    attn mha(heads=4) norm=pre norm_share=n\n"
                "    ffn mlp() norm=pre(rmsnorm) norm_share=n\n  }\n  repeat 2 layer")
    path = tmp_path / "bad.block"
    path.write_text(text, encoding="utf-8")
    rc, _, err = run_main(capsys, "check", str(path))
    assert rc == 1
    assert "normshare:" not in err
    assert_located(err, path, text, Err("norm=pre(rmsnorm)", ("norm_share", "'n'", "rmsnorm",
                                                              "layernorm"), ("kind",)))


def test_unknown_variable_as_repeat_count(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    check_case(tmp_path, spec("  block layer { ffn mlp() }\n  repeat layers layer"),
               Err("layers layer", ("unknown variable", "'layers'")), capsys)


# --------------------------------------------------------------------------- hostile input
# Issue 10: inputs that cost unbounded time or memory. Each case is a spec a user (or a
# fuzzer) can write; each must end promptly with a located error and exit code 1.

BIG_PRIME = 2**62 - 57  # the largest prime the language's integers hold


HOSTILE = [
    pytest.param(layer("ffn mlp(d_ff=int(1e300))"), Err("int(1e300)", ("number too large", "10**300"),
                 ("2**62",)), id="int-of-a-huge-float"),
    pytest.param(layer("ffn mlp(d_ff=round(1e300))"), Err("round(1e300)", ("number too large",)),
                 id="round-of-a-huge-float"),
    pytest.param(layer("ffn mlp(d_ff=ceil(0-1e300))"), Err("ceil(0-1e300)", ("number too large",)),
                 id="ceil-of-a-huge-float"),
    pytest.param(layer("ffn mlp(d_ff=1e300 // 1e-300)"), Err("1e300 // 1e-300", ("number too large",)),
                 id="floordiv-to-infinity"),
    pytest.param(layer("ffn mlp(d_ff=(2**62) // 1 * 2)"), Err("(2**62) // 1 * 2",
                 ("number too large",)), id="product-past-the-cap"),
    pytest.param(layer("ffn mlp(d_ff=round(5, 0-100000))"), Err("0-100000", ("round()", "too many"),
                 ("digits",)), id="round-to-a-bignum-power-of-ten"),
    pytest.param(layer("ffn mlp(d_ff=2**10**10)"), Err("2**10**10", ("too large",), ("2**62",)),
                 id="power-tower"),
    pytest.param(layer("ffn mlp(dropout=0.5**(0-5000))"), Err("0.5**(0-5000)", ("too large",)),
                 id="negative-power-of-a-fraction"),
    pytest.param(layer("ffn mlp(d_ff=2**(0-1000))"), Err("d_ff=2**(0-1000)",
                 ("'d_ff' expects an integer", "e-302"),), id="negative-exponent-is-a-small-float"),
    pytest.param(layer("ffn mlp(d_ff=2**62)"), Err("mlp(d_ff=2**62)",
                 ("more than 10**15 parameters", "5.9e+20"), ("typo",)), id="d-ff-at-the-cap"),
    pytest.param(layer("ffn mlp()").replace("vocab=100", "vocab=2**62"),
                 Err("tokens(vocab=2**62", ("more than 10**15 parameters",)), id="vocab-at-the-cap"),
    pytest.param(layer("moe topk(experts=2**40, k=2, d_ff=64)"), Err("topk(experts=2**40",
                 ("more than 10**15 parameters",)), id="experts-past-sense"),
    pytest.param(layer("attn mha(heads=7)").replace("d = 64", f"d = {BIG_PRIME}"),
                 Err("heads=7", ("heads=7 does not divide", str(BIG_PRIME)),
                     ("no divisor up to 4096", f"d={BIG_PRIME - BIG_PRIME % 7}",
                      f"d={BIG_PRIME - BIG_PRIME % 7 + 7}", "head_dim=")), id="heads-hint-on-a-huge-prime"),
    pytest.param(layer("ffn mlp()", "repeat 2**62 layer { at 0..2**62-1: ffn.d_ff = 8 }"),
                 Err("2**62 layer", ("more than 100,000 instances",), ("typo",)),
                 id="overrides-over-a-huge-repeat"),
    pytest.param(spec('  pattern "' + "F" * 200_000 + '" F=mlp()'), Err('pattern "FFF', ("pattern",
                 "200,000 letters", "100,000 instances"),), id="pattern-of-200k-letters"),
]


@pytest.mark.parametrize(("text", "e"), HOSTILE)
def test_hostile_value_is_a_located_error(tmp_path: Path, text: str, e: Err,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    if len(text) > 10_000:  # a line too long to show whole: check the head line only
        path = tmp_path / "bad.block"
        path.write_text(text, encoding="utf-8")
        rc, out, err = run_main(capsys, "check", str(path))
        line, col = loc(text, e.needle)
        assert rc == 1 and "Traceback" not in err and len(err) < 2000
        head = err.splitlines()[0]
        assert head.startswith(f"{path}:{line}:{col}: error: ")
        assert all(w.lower() in head.lower() for w in e.words), head
        return
    check_case(tmp_path, text, e, capsys)


def test_negative_exponent_is_a_float_where_one_may_stand() -> None:
    plan = blockdsl.check(layer("ffn mlp(dropout=2**(0-1000))"))
    assert plan.layers[0].args["dropout"] == 2.0**-1000
    assert blockdsl.check(layer("ffn mlp(d_ff=2**-1 * 128)")).layers[0].args["d_ff"] == 64


@pytest.mark.parametrize("digits", [40, 4000, 5000, 300_000])
def test_long_integer_literal_is_located_and_shortened(tmp_path: Path, digits: int,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The literal is refused from its token (Python's int() stops at 4300 digits);
    with heads not dividing it, the divisor hint was a loop over every integer below d."""
    number = "7" * digits
    text = layer("attn mha(heads=3)").replace("d = 64", f"d = {number}")
    path = tmp_path / "bad.block"
    path.write_text(text, encoding="utf-8")
    rc, out, err = run_main(capsys, "check", str(path))
    assert rc == 1 and out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert lines[0] == f"{path}:2:5: error: number too large: 777777777777…777777777777 ({digits} digits)"
    assert len(err) < 1000  # the number is never printed whole
    assert lines[-1] == "  hint: integers are capped at 2**62 (about 4.6e18); write large floats as 1e30"


def test_long_names_and_strings_are_shortened(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    name = "v" * 500_000
    for sub in (f"ffn mlp(d_ff={name})", f'ffn mlp(act="{name}")'):
        path = tmp_path / "bad.block"
        path.write_text(layer(sub), encoding="utf-8")
        rc, out, err = run_main(capsys, "check", str(path))
        assert rc == 1 and "Traceback" not in err
        assert err.startswith(f"{path}:7:") and len(err) < 2000, err[:300]


# ---- includes

BODY = spec("  block layer { ffn mlp() }\n  repeat 1 layer")
SECRET = "root:x:0:0:TOP-SECRET-LINE:/root:/bin/bash\n"
UP = "../" * 40  # far enough up from any tmp folder to reach /


def include_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str,
                  *words: str) -> str:
    text = f'include "{target}"\n' + BODY
    path = tmp_path / "top.block"
    path.write_text(text, encoding="utf-8")
    rc, out, err = run_main(capsys, "check", str(path))
    assert rc == 1 and out == "" and "Traceback" not in err
    assert err.startswith(f"{path}:1:1: error: "), err
    for w in words:
        assert w in err.splitlines()[0], err
    assert "TOP-SECRET" not in err and "root:" not in err
    return err


def test_include_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Relative paths to regular .block files only; content of other files is never shown."""
    (tmp_path / "secret.txt").write_text(SECRET)
    (tmp_path / "secret.block").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "zero.block").symlink_to("/dev/zero")
    (tmp_path / "dir.block").mkdir()
    include_error(tmp_path, capsys, "/etc/passwd", "include paths must be relative")
    include_error(tmp_path, capsys, str(tmp_path / "secret.txt"), "must be relative")
    include_error(tmp_path, capsys, UP + "etc/passwd", "must name a .block file")
    include_error(tmp_path, capsys, "secret.txt", "must name a .block file")
    include_error(tmp_path, capsys, "secret.block", "links to a file not named .block")
    include_error(tmp_path, capsys, "/dev/zero", "must be relative")
    include_error(tmp_path, capsys, UP + "dev/zero", "must name a .block file")
    include_error(tmp_path, capsys, "dir.block", "is a folder")
    include_error(tmp_path, capsys, "zero.block", "links to a file not named .block")
    (tmp_path / "big.block").write_text("# x\n" * 300_000)  # 1.2 MB of comments
    include_error(tmp_path, capsys, "big.block", "more than the 1 MiB")
    (tmp_path / "bin.block").write_bytes(b"d = 1\n\xff\xfe" + SECRET.encode())
    include_error(tmp_path, capsys, "bin.block", "not UTF-8")
    # `..` may leave the including file's folder: the shipped specs include "../x.block"
    (tmp_path / "lib.block").write_text("vocab = 77\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.block").write_text('include "../lib.block"\n'
                                              + BODY.replace("vocab=100", "vocab=vocab"))
    assert blockdsl.check(tmp_path / "sub" / "m.block").vocab == 77


def test_spec_that_is_not_block_text_is_never_quoted(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text(SECRET)
    (tmp_path / "link.block").symlink_to(tmp_path / "notes.txt")
    for f in ("notes.txt", "link.block"):
        rc, out, err = run_main(capsys, "check", str(tmp_path / f))
        assert rc == 1 and "Traceback" not in err
        assert err.splitlines()[0] == f"{tmp_path / f}:1:5: error: this is not .block text"
        assert "TOP-SECRET" not in err and "root:x" not in err
    rc, out, err = run_main(capsys, "check", "/etc/passwd")
    assert rc == 1 and "root:x" not in err and err.startswith("/etc/passwd:1:")


def test_include_once_per_load(tmp_path: Path) -> None:
    """A diamond reads the shared file once, so a later override of it stands."""
    (tmp_path / "common.block").write_text("vocab = 50\n")
    (tmp_path / "a.block").write_text('include "common.block"\nvocab = 60\n')
    (tmp_path / "b.block").write_text('include "common.block"\n')
    (tmp_path / "top.block").write_text('include "a.block"\ninclude "b.block"\n'
                                        + BODY.replace("vocab=100", "vocab=vocab"))
    module = blockdsl.load(tmp_path / "top.block")
    assert [i.path for i in module.includes] == ["a.block", "common.block", "b.block"]
    assert blockdsl.check(module).vocab == 60


def test_include_depth_and_count_are_capped(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(70):
        (tmp_path / f"f{i}.block").write_text(f'include "f{i + 1}.block"\n')
    (tmp_path / "f70.block").write_text("")
    rc, _, err = run_main(capsys, "check", str(tmp_path / "f0.block"))
    assert rc == 1 and "includes nested more than 64 deep" in err.splitlines()[0]


def test_hostile_files_through_the_command_line(tmp_path: Path) -> None:
    """Real processes, each with a timeout: a FIFO or /dev/zero used to hang or eat memory,
    and 40 files that each include the next twice used to take 2**40 parses."""
    fifo = tmp_path / "pipe.block"
    os.mkfifo(fifo)
    (tmp_path / "inc-fifo.block").write_text('include "pipe.block"\n' + BODY)
    for i in range(40):
        (tmp_path / f"c{i}.block").write_text(f'include "c{i + 1}.block"\ninclude "c{i + 1}.block"\n'
                                              f"v{i} = {i}\n" + (BODY if i == 0 else ""))
    (tmp_path / "c40.block").write_text("v40 = 40\n")
    (tmp_path / "huge.block").write_text(layer("ffn mlp()").replace("d = 64", "d = " + "9" * 5000))
    runs = {
        "fifo": ([str(fifo)], "is not a regular file"),
        "inc-fifo": ([str(tmp_path / "inc-fifo.block")], "is not a regular file"),
        "zero": (["/dev/zero"], "is not a regular file"),
        "urandom": (["/dev/urandom"], "is not a regular file"),
        "huge": ([str(tmp_path / "huge.block")], "(5000 digits)"),
        "chain": ([str(tmp_path / "c0.block")], None),
    }
    procs = {k: subprocess.Popen([sys.executable, "-m", "blockdsl.cli", "check", *argv], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, (argv, _) in runs.items()}
    try:
        res = {k: (*p.communicate(timeout=60), p.returncode) for k, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for k, (out, err, rc) in res.items():
        assert "Traceback" not in err, (k, err)
        words = runs[k][1]
        if words is None:
            assert rc == 0 and out.startswith("ok: "), (k, out, err)
        else:
            assert rc == 1 and words in err.splitlines()[0], (k, err)
