"""Numbers: the torch-free accounting (graph.py) against the lowered module and against hand.

- report params == sum(p.numel()) of the built module, for every spec in specs/ and
  tests/specs/ (built on the meta device, so GPT-2 and ViT-B cost nothing);
- the two published counts (GPT-2 small, ViT-B/16);
- hand-computed counts for small specs, one feature at a time;
- active params and FLOPs per token of a dense model against the documented conventions;
- sharing is real: one module object, gradient = sum over its uses;
- golden summaries of specs/ (regenerate with BLOCKDSL_UPDATE_GOLDEN=1).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blockdsl
from blockdsl.plan import Plan

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
TEST_SPECS = ROOT / "tests" / "specs"
GOLDEN = ROOT / "tests" / "golden"

# Primitives whose module is written separately; a spec using one is skipped (with the
# reason) until the module exists. Every other primitive must build.
PRIM_MODULE = {
    "topk": "blockdsl.nn.moe",
    "expert_choice": "blockdsl.nn.moe",
    "sigma_moe": "blockdsl.nn.moe",
    "switchhead": "blockdsl.nn.switchhead",
}


# --------------------------------------------------------------------------- helpers


def spec_files() -> list[Path]:
    return sorted(SPECS.rglob("*.block"))


def fixture_spec_files() -> list[Path]:
    return sorted(TEST_SPECS.glob("*.block"))


def spec_id(p: Path) -> str:
    return str(p.relative_to(ROOT))


def models_of(path: Path) -> list[str]:
    """Every model the file itself defines (a file may hold several, or none)."""
    module = blockdsl.load(path)
    return [m for m in module.own_models if not module.model(m).is_space]


def missing_modules(plan: Plan) -> list[str]:
    """Modules this plan's primitives need that do not exist yet."""
    out = set()
    for layer in plan.layers:
        mod = PRIM_MODULE.get(layer.prim)
        if mod and importlib.util.find_spec(mod) is None:
            out.add(mod)
    return sorted(out)


def build_meta(spec: Any, model: str | None = None) -> torch.nn.Module:
    """Build with every tensor on the meta device: shapes only, no memory, no init cost.

    (The first meta build in a process pays about 3 s: torch imports torch._dynamo for
    some meta kernels, e.g. normal_ and eye.)
    """
    with torch.device("meta"):
        return blockdsl.build(spec, model=model, device="meta")


def module_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def partition(plan: Plan) -> tuple[list[tuple[int, ...]], list[tuple[tuple[int, int], ...]]]:
    """Which layer indices share a primitive, and which (layer, norm slot) share a norm.

    Compares the structure of sharing, not the group names (which render() renames).
    """
    prim: dict[str, list[int]] = defaultdict(list)
    norm: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for layer in plan.layers:
        prim[layer.key].append(layer.index)
        for j, n in enumerate(layer.norms):
            norm[n.key].append((layer.index, j))
    return sorted(tuple(v) for v in prim.values()), sorted(tuple(v) for v in norm.values())


def shared_groups(plan: Plan) -> tuple[list[tuple[int, ...]], list[tuple[tuple[int, int], ...]]]:
    p, n = partition(plan)
    return [g for g in p if len(g) > 1], [g for g in n if len(g) > 1]


def tiny(body: str, *, d: int = 16, stem: str = "tokens(vocab=10, context=4)",
         head: str = "lm()", extra: str = "") -> str:
    """A small model around a block body, repeated once."""
    return f"""
d = {d}
model t {{
  stem {stem}
  head {head}
  {extra}
  block layer {{
{body}
  }}
  repeat 1 layer
}}
"""


def params(src: str) -> int:
    return blockdsl.report(src).stored_params


# --------------------------------------------------------------------------- parity


def all_models() -> list[Any]:
    """(path, model) for every model of every spec; a spec that fails to load still gets
    one case (model None), which then fails loudly instead of vanishing from the list."""
    out = []
    for path in spec_files() + fixture_spec_files():
        try:
            names: list[str | None] = list(models_of(path))
        except blockdsl.BlockError:
            names = [None]
        for name in names:
            out.append(pytest.param(path, name, id=f"{spec_id(path)}::{name}"))
    return out


def test_every_shipped_spec_is_covered() -> None:
    """The glob finds the shipped specs (including subfolders), so parity is not vacuous."""
    ids = {spec_id(p) for p in spec_files()}
    assert {"specs/gpt2-small.block", "specs/vit-b16.block", "specs/tiny/gpt.block"} <= ids


@pytest.mark.parametrize(("path", "model"), all_models())
def test_report_params_equal_module_params(path: Path, model: str) -> None:
    plan = blockdsl.resolve(path, model)
    missing = missing_modules(plan)
    if missing:
        pytest.skip(f"primitive module(s) not written yet: {', '.join(missing)}")
    rep = blockdsl.report(plan)
    m = build_meta(plan)
    assert module_params(m) == rep.stored_params
    assert rep.stored_params == sum(rep.breakdown.values())


def test_published_counts() -> None:
    assert blockdsl.report(SPECS / "gpt2-small.block").stored_params == 124_439_808
    assert blockdsl.report(SPECS / "vit-b16.block").stored_params == 86_567_656
    assert module_params(build_meta(SPECS / "vit-b16.block")) == 86_567_656
    assert module_params(build_meta(SPECS / "gpt2-small.block")) == 124_439_808


# --------------------------------------------------------------------------- by hand

D = 16  # width of the hand-computed specs below
LN, RMS = 2 * D, D  # one LayerNorm (weight + bias), one RMSNorm (weight)
EMB = 10 * D + 4 * D  # vocab 10 and 4 learned positions
HEAD = D * 10  # untied LM head, no bias
FINAL = LN


def test_hand_attention_bias_and_gqa() -> None:
    # heads=2 (head_dim 8): qkv d x 3d (+3d), out d x d (+d)
    mha = D * 3 * D + 3 * D + D * D + D
    assert params(tiny("a mha(heads=2)")) == EMB + HEAD + FINAL + LN + mha
    no_bias = D * 3 * D + D * D
    assert params(tiny("a mha(heads=2, bias=false)")) == EMB + HEAD + FINAL + LN + no_bias
    # GQA: 4 query heads of 4, 1 kv head: qkv width (4 + 2) * 4 = 24
    gqa = D * 24 + 24 + D * D + D
    assert params(tiny("a mha(heads=4, kv_heads=1)")) == EMB + HEAD + FINAL + LN + gqa
    # Explicit head_dim that does not come from d/heads: 3 heads of 5
    hd = D * 45 + 45 + 15 * D + D
    assert params(tiny("a mha(heads=3, head_dim=5)")) == EMB + HEAD + FINAL + LN + hd


def test_hand_ffn_gated_and_plain() -> None:
    plain = D * 24 + 24 + 24 * D + D
    assert params(tiny("f mlp(d_ff=24)")) == EMB + HEAD + FINAL + LN + plain
    gated = D * 48 + 48 + 24 * D + D  # gate and up fused: 2 d_ff wide
    assert params(tiny("f mlp(d_ff=24, act=swiglu)")) == EMB + HEAD + FINAL + LN + gated
    gated_nb = D * 48 + 24 * D
    assert params(tiny("f mlp(d_ff=24, act=geglu, bias=false)")) == EMB + HEAD + FINAL + LN + gated_nb
    default = D * 4 * D + 4 * D + 4 * D * D + D  # d_ff defaults to 4d
    assert params(tiny("f mlp()")) == EMB + HEAD + FINAL + LN + default


def test_hand_stem_and_head() -> None:
    f = "f mlp(d_ff=8, bias=false)"
    ffn = 2 * D * 8
    body = FINAL + LN + ffn
    assert params(tiny(f, head="lm(tie=true)")) == EMB + body
    assert params(tiny(f, head="lm(tie=true, bias=true)")) == EMB + 10 + body
    assert params(tiny(f, head="lm(bias=true)")) == EMB + HEAD + 10 + body
    rope = "tokens(vocab=10, context=4, pos=rope)"
    assert params(tiny(f, stem=rope)) == 10 * D + HEAD + body
    nopos = "tokens(vocab=10, context=4, pos=none)"
    assert params(tiny(f, stem=nopos, head="lm(tie=true)")) == 10 * D + body


@pytest.mark.parametrize(
    ("cls", "pool", "stem_params"),
    [
        # proj 3*4*4*d + d; class token d; positions (4 patches + cls) * d
        ("learned", "cls", 3 * 16 * D + D + D + 5 * D),
        ("zero", "cls", 3 * 16 * D + D + 5 * D),  # a constant zero token: no parameter
        ("none", "gap", 3 * 16 * D + D + 4 * D),
    ],
)
def test_hand_patches(cls: str, pool: str, stem_params: int) -> None:
    stem = f"patches(image=8, patch=4, channels=3, cls={cls})"
    head = f"classify(classes=7, pool={pool})"
    src = tiny("f mlp(d_ff=8, bias=false)", stem=stem, head=head)
    assert params(src) == stem_params + (D * 7 + 7) + FINAL + LN + 2 * D * 8
    assert blockdsl.resolve(src).seq == 4 + (cls != "none")
    m = build_meta(src)
    assert module_params(m) == params(src)
    pre = src.replace(f"pool={pool})", f"pool={pool}, pre_logits=5)")
    assert params(pre) == stem_params + (D * 5 + 5) + (5 * 7 + 7) + FINAL + LN + 2 * D * 8


def test_hand_norm_kinds_and_placements() -> None:
    f = "f mlp(d_ff=8, bias=false)"
    ffn = 2 * D * 8
    a = "a mha(heads=2, bias=false)"
    mha = 4 * D * D
    base = EMB + HEAD

    def with_norm(line: str, extra: str = "") -> int:
        return params(tiny(line, extra=extra))

    assert with_norm(f + " norm=pre") == base + FINAL + LN + ffn
    assert with_norm(f + " norm=pre", "norm rmsnorm()") == base + RMS + RMS + ffn
    assert with_norm(f + " norm=pre", "norm layernorm(bias=false)") == base + D + D + ffn
    assert with_norm(f + " norm=pre(rmsnorm)") == base + FINAL + RMS + ffn
    assert with_norm(f + " norm=post") == base + FINAL + LN + ffn
    assert with_norm(f + " norm=sandwich") == base + FINAL + 2 * LN + ffn
    assert with_norm(f + " norm=sandwich(rmsnorm)") == base + FINAL + 2 * RMS + ffn
    assert with_norm(f + " norm=none") == base + FINAL + ffn
    # peri on a dense FFN: nothing precedes a softmax/sigmoid, so no norm at all
    assert with_norm(f + " norm=peri") == base + FINAL + ffn
    # peri on attention: one norm feeding Q and K
    assert with_norm(a + " norm=peri") == base + FINAL + LN + mha
    assert with_norm(f, "final_norm none()") == base + LN + ffn
    assert with_norm(f, "final_norm rmsnorm()") == base + RMS + LN + ffn


def test_hand_sharing_counts_once() -> None:
    ffn = 2 * D * 8
    src = f"""
d = {D}
model t {{
  stem tokens(vocab=10, context=4)
  head lm()
  block layer {{
    f mlp(d_ff=8, bias=false) share=f
    g mlp(d_ff=8, bias=false) share=f norm_share=n
  }}
  repeat 3 layer
}}
"""
    # one FFN for all six uses; f's norms individual (3), g's norms one shared
    assert params(src) == EMB + HEAD + FINAL + ffn + 3 * LN + LN
    grouped = src.replace("share=f", "").replace("norm_share=n", "").replace(
        "repeat 3 layer", "repeat 6 layer groups=2"
    )
    # two copies of the block, each with two FFNs and two norms
    assert params(grouped) == EMB + HEAD + FINAL + 2 * (2 * ffn + 2 * LN)


def test_dense_active_params_and_flops_by_hand() -> None:
    src = """
d = 16
model t {
  stem tokens(vocab=11, context=5, pos=learned)
  head lm(tie=false)
  block layer {
    attn mha(heads=2)
    ffn  mlp(d_ff=32)
  }
  repeat 2 layer
}
"""
    rep = blockdsl.report(src)
    mha = 16 * 48 + 48 + 16 * 16 + 16
    mlp = 16 * 32 + 32 + 32 * 16 + 16
    stored = 2 * (mha + mlp + 2 * 32) + (11 * 16 + 5 * 16) + 16 * 11 + 32
    assert rep.stored_params == stored == 4912
    # dense: every parameter is active for every token; embeddings count in full
    assert rep.active_params_per_token == stored
    # forward, multiply-add = 2; attention adds 4*T*heads*head_dim at T = context;
    # norms, activations, softmax and the embedding lookup are free; the LM head is 2*d*V
    attn_f = 2 * (16 * 48 + 16 * 16) + 4 * 5 * 2 * 8
    mlp_f = 2 * (16 * 32 + 32 * 16)
    assert rep.flops_per_token == 2 * (attn_f + mlp_f) + 2 * 16 * 11 == 9184
    # a gated FFN costs three d x d_ff matmuls; GQA shrinks the K/V projections
    gated = blockdsl.report(src.replace("mlp(d_ff=32)", "mlp(d_ff=32, act=swiglu)"))
    assert gated.flops_per_token == rep.flops_per_token + 2 * 2 * (16 * 32)
    gqa = blockdsl.report(src.replace("mha(heads=2)", "mha(heads=2, kv_heads=1)"))
    assert gqa.flops_per_token == rep.flops_per_token - 2 * 2 * (2 * 16 * 8)


def test_moe_active_params_by_hand() -> None:
    """Top-k: a token uses its router and k of the experts; stored holds all experts."""
    rep = blockdsl.report(TEST_SPECS / "moe_small.block")
    d, e, k, f = 16, 4, 2, 32
    expert = d * f + f + f * d + d
    moe = d * e + e * expert  # router (no bias) + experts
    dense = d * 64 + 64 + 64 * d + d
    mha = d * 3 * d + 3 * d + d * d + d
    stored = (40 * d + 8 * d) + 2 * d + 3 * mha + dense + 2 * moe + 6 * 2 * d
    assert rep.stored_params == stored == 15_088
    assert rep.active_params_per_token == stored - 2 * (e - k) * expert == 10_800
    dense_f = 2 * (d * 64 + 64 * d)
    moe_f = 2 * d * e + k * 2 * (d * f + f * d)
    attn_f = 2 * (d * 3 * d + d * d) + 4 * 8 * d
    assert rep.flops_per_token == 3 * attn_f + dense_f + 2 * moe_f + 2 * d * 40


def test_shared_layers_count_flops_per_use_and_params_once() -> None:
    base = blockdsl.report(TEST_SPECS / "shared_ffn.block")
    unshared = blockdsl.report((TEST_SPECS / "shared_ffn.block").read_text()
                               .replace("share=ffn", "").replace("norm_share=attn_norm", ""))
    assert base.flops_per_token == unshared.flops_per_token
    mlp = 32 * 64 + 64 + 64 * 32 + 32
    assert unshared.stored_params - base.stored_params == 2 * mlp + 2 * 64
    assert base.active_params_per_token == base.stored_params


def test_vit_flops_by_hand() -> None:
    rep = blockdsl.report(SPECS / "tiny" / "vit.block")
    d, t = 64, 17  # 16 patches + class token
    attn = 2 * (d * 3 * d + d * d) + 4 * t * d
    mlp = 2 * (d * 4 * d + 4 * d * d)
    patch = 2 * 1 * 2 * 2 * d * 16 / t  # the patch projection, spread over the tokens
    head = 2 * d * 10 / t  # one classification per image
    assert rep.flops_per_token == pytest.approx(3 * (attn + mlp) + patch + head, rel=1e-12)


# --------------------------------------------------------------------------- sharing is real


def _residuals(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [r for unit in model.units for r in unit]


def test_shared_sublayer_is_one_module_with_individual_norms() -> None:
    m = blockdsl.build(TEST_SPECS / "shared_ffn.block", device="cpu")
    res = _residuals(m)
    attn, ffn = res[0::2], res[1::2]
    assert ffn[0].fn is ffn[1].fn is ffn[2].fn
    # individual norms under shared weights
    assert len({id(r.norms[0]) for r in ffn}) == 3
    # individual attention weights, one shared attention norm
    assert len({id(r.fn) for r in attn}) == 3
    assert attn[0].norms[0] is attn[1].norms[0] is attn[2].norms[0]
    # a shared tensor is one parameter of the module
    assert module_params(m) == blockdsl.report(TEST_SPECS / "shared_ffn.block").stored_params


@pytest.mark.parametrize(("spec", "copies"), [
    ("groups_abab.block", [0, 1, 0, 1]),
    ("groups_aabb.block", [None, 0, 0, 1, 1]),
])
def test_groups_share_everything_in_a_copy(spec: str, copies: list[int | None]) -> None:
    m = blockdsl.build(TEST_SPECS / spec, device="cpu")
    units = list(m.units)
    owner: dict[int, torch.nn.Module] = {}
    for u, c in enumerate(copies):
        if c is None:
            continue
        if c not in owner:
            owner[c] = units[u]
            continue
        for mine, theirs in zip(units[u], owner[c]):
            assert mine.fn is theirs.fn
            assert len(mine.norms) == len(theirs.norms) > 0
            for a, b in zip(mine.norms, theirs.norms):
                assert a is b
    a, b = owner[0], owner[1]
    for x, y in zip(a, b):
        assert x.fn is not y.fn
        assert all(p is not q for p, q in zip(x.norms, y.norms))


def _twin_grads(spec_text: str, unshared_text: str) -> tuple:
    torch.manual_seed(0)
    shared = blockdsl.build(spec_text, device="cpu").double()
    twin = blockdsl.build(unshared_text, device="cpu").double()
    s_res, t_res = _residuals(shared), _residuals(twin)
    # give the twin exactly the shared model's weights, copy by copy
    twin.stem.load_state_dict(shared.stem.state_dict())
    twin.head.load_state_dict(shared.head.state_dict())
    twin.final_norm.load_state_dict(shared.final_norm.state_dict())
    for s, t in zip(s_res, t_res):
        t.fn.load_state_dict(s.fn.state_dict())
        for sn, tn in zip(s.norms, t.norms):
            tn.load_state_dict(sn.state_dict())
    x = torch.randint(0, 50, (2, 8))
    out_s, out_t = shared(x).logits, twin(x).logits
    torch.testing.assert_close(out_s, out_t)
    out_s.square().mean().backward()
    out_t.square().mean().backward()
    return shared, twin, s_res, t_res


def test_shared_gradient_is_sum_of_uses() -> None:
    text = (TEST_SPECS / "shared_ffn.block").read_text()
    unshared = text.replace("share=ffn", "").replace("norm_share=attn_norm", "")
    _, _, s_res, t_res = _twin_grads(text, unshared)
    # the shared FFN: grad == sum of the three copies' grads
    ffn_s = s_res[1].fn
    for name, p in ffn_s.named_parameters():
        total = sum(dict(t.fn.named_parameters())[name].grad for t in t_res[1::2])
        torch.testing.assert_close(p.grad, total)
        assert p.grad.abs().sum() > 0
    # the shared attention norm likewise
    for name, p in s_res[0].norms[0].named_parameters():
        total = sum(dict(t.norms[0].named_parameters())[name].grad for t in t_res[0::2])
        torch.testing.assert_close(p.grad, total)
    # individual norms of the shared FFN: each its own copy's gradient
    for s, t in zip(s_res[1::2], t_res[1::2]):
        torch.testing.assert_close(s.norms[0].weight.grad, t.norms[0].weight.grad)


def test_grouped_gradient_is_sum_of_uses() -> None:
    text = (TEST_SPECS / "groups_abab.block").read_text()
    unshared = text.replace("groups=2 order=abab", "")
    _, _, s_res, t_res = _twin_grads(text, unshared)
    per_unit = 2
    for copy in (0, 1):
        for j in range(per_unit):
            s = s_res[copy * per_unit + j]
            uses = [t_res[u * per_unit + j] for u in (copy, copy + 2)]  # abab: copy, copy + 2
            for name, p in s.fn.named_parameters():
                total = sum(dict(t.fn.named_parameters())[name].grad for t in uses)
                torch.testing.assert_close(p.grad, total)
            for k, n in enumerate(s.norms):
                total = sum(t.norms[k].weight.grad for t in uses)
                torch.testing.assert_close(n.weight.grad, total)


# --------------------------------------------------------------------------- property


@st.composite
def dense_specs(draw: st.DrawFn) -> str:
    d = draw(st.sampled_from([8, 12, 16, 24]))
    heads = draw(st.sampled_from([h for h in (1, 2, 3, 4, 6, 8) if d % h == 0]))
    kv = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
    layers = draw(st.integers(1, 4))
    d_ff = draw(st.integers(1, 40))
    act = draw(st.sampled_from(["gelu", "relu", "swiglu", "geglu"]))
    bias = draw(st.sampled_from(["true", "false"]))
    default = draw(st.sampled_from(["layernorm()", "rmsnorm()", "layernorm(bias=false)"]))
    placements = [draw(st.sampled_from(["pre", "post", "sandwich", "peri", "none"])) for _ in "af"]
    kinds = [draw(st.sampled_from(["", "(rmsnorm)", "(layernorm)"])) for _ in "af"]
    share = [draw(st.sampled_from(["", " share=w"])) for _ in "af"]
    if share[0] and share[1]:
        share[1] = " share=w2"
    nshare = [draw(st.sampled_from(["", " norm_share=n"])) for _ in "af"]
    if nshare[0] and nshare[1] and kinds[0] != kinds[1]:
        nshare[1] = ""  # norms sharing one name must agree in kind
    groups = draw(st.sampled_from(["", f" groups={max(1, layers // 2)}"]))
    final = draw(st.sampled_from(["", "final_norm none()", "final_norm rmsnorm()"]))
    tie = draw(st.sampled_from(["true", "false"]))
    pos = draw(st.sampled_from(["learned", "rope", "none"]))
    return f"""
d = {d}
model r {{
  stem tokens(vocab=13, context=6, pos={pos})
  head lm(tie={tie})
  norm {default}
  {final}
  block layer {{
    attn mha(heads={heads}, kv_heads={kv}, bias={bias}) norm={placements[0]}{kinds[0]}{share[0]}{nshare[0]}
    ffn  mlp(d_ff={d_ff}, act={act}, bias={bias}) norm={placements[1]}{kinds[1]}{share[1]}{nshare[1]}
  }}
  repeat {layers} layer{groups}
}}
"""


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dense_specs())
def test_random_dense_specs_report_equals_module(src: str) -> None:
    plan = blockdsl.resolve(src)
    m = build_meta(plan)
    assert module_params(m) == blockdsl.report(plan).stored_params


# --------------------------------------------------------------------------- golden


def golden_name(path: Path) -> str:
    """specs/gpt2-small.block -> gpt2-small.json; specs/tiny/gpt.block -> tiny__gpt.json."""
    return "__".join(path.relative_to(SPECS).with_suffix("").parts) + ".json"


def summary(path: Path) -> dict[str, Any]:
    plan = blockdsl.resolve(path)
    rep = blockdsl.report(plan)
    layers, norms = shared_groups(plan)
    return {
        "spec": str(path.relative_to(ROOT)),
        "model": rep.name,
        "stored_params": rep.stored_params,
        "active_params_per_token": rep.active_params_per_token,
        "flops_per_token": rep.flops_per_token,
        "layers": rep.layers,
        "units": rep.units,
        "breakdown": rep.breakdown,
        "primitives": " ".join(layer.prim for layer in plan.layers),
        "sharing": {
            "layers": [list(g) for g in layers],
            "norms": [[list(x) for x in g] for g in norms],
        },
    }


@pytest.mark.parametrize("path", spec_files(), ids=spec_id)
def test_golden_summary(path: Path) -> None:
    golden = GOLDEN / golden_name(path)
    got = summary(path)
    if os.environ.get("BLOCKDSL_UPDATE_GOLDEN"):
        GOLDEN.mkdir(parents=True, exist_ok=True)
        golden.write_text(json.dumps(got, indent=2) + "\n", encoding="utf-8")
    if not golden.exists():
        pytest.fail(f"no golden summary {golden.relative_to(ROOT)}; "
                    "run `BLOCKDSL_UPDATE_GOLDEN=1 pytest tests/test_accounting.py -k golden`")
    want = json.loads(golden.read_text(encoding="utf-8"))
    assert math.isclose(got.pop("flops_per_token"), want.pop("flops_per_token"), rel_tol=1e-12)
    assert got == want
