"""Initialisation parity with MoEUT's own code (issue 13).

Two inits follow the authors' repository by default for MoEUT: the token embedding's std
(1/sqrt(d), `stem tokens(init=fan_in)` in specs/moeut.block) and SwitchHead's selector
rows (each row scaled by its own std, `switchhead(selector_init=row_std)`, the default).
The statistics below are worked out by hand, not by re-running the code under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import blockdsl
from blockdsl.nn.moe import renorm_rows_keep_std
from blockdsl.nn.stems import TokenEmbedding
from blockdsl.nn.switchhead import SwitchHeadAttention, renorm_rows_own_std

ROOT = Path(__file__).resolve().parents[2]


def test_row_std_renorm_keeps_each_rows_own_scale_by_hand() -> None:
    # rows [1,-1] and [2,-2]: row stds (unbiased) sqrt2 and 2sqrt2, both normalise to
    # [1,-1]/sqrt2, whose whole-tensor std is sqrt(2/3); so row i becomes
    # [1,-1]/sqrt2 * s_i / sqrt(2/3) = [1,-1] * sqrt(3/2) * (1, 2)_i
    w = torch.tensor([[1.0, -1.0], [2.0, -2.0]], dtype=torch.float64)
    renorm_rows_own_std(w)
    r = math.sqrt(1.5)
    torch.testing.assert_close(w, torch.tensor([[r, -r], [2 * r, -2 * r]], dtype=torch.float64))


def test_keep_std_renorm_makes_rows_equal_by_hand() -> None:
    # whole-tensor std of [1,-1,2,-2] is sqrt(10/3); after unit rows the std is sqrt(2/3),
    # so every entry is +-(1/sqrt2) * sqrt(10/3) / sqrt(2/3) = +-sqrt(5/2)
    w = torch.tensor([[1.0, -1.0], [2.0, -2.0]], dtype=torch.float64)
    renorm_rows_keep_std(w)
    r = math.sqrt(2.5)
    torch.testing.assert_close(w, torch.tensor([[r, -r], [r, -r]], dtype=torch.float64))


@pytest.mark.parametrize("mode", ["row_std", "keep_std"])
def test_switchhead_selector_statistics(mode: str) -> None:
    d, h, e, n_app = 256, 4, 16, 8
    torch.manual_seed(0)
    m = SwitchHeadAttention(d, h, 32, e, k=2, n_applications=n_app, selector_init=mode)
    std_in = math.sqrt(2.0 / n_app) / math.sqrt(d)  # = 0.03125
    for sel in (m.sel_v, m.sel_o):
        norms = sel.norm(dim=-1)
        # both keep the whole tensor's std near std_in (N = 16384 entries: within 2%)
        assert abs(sel.std().item() / std_in - 1) < 0.02
        if mode == "keep_std":
            assert norms.std().item() / norms.mean().item() < 1e-6
        else:
            # row i is unit_i * c_i, so its norm over its std is 1/std(unit_i) ~ sqrt(d-1)
            # for every row (up to each row's small mean: 0.25% here), while the norms
            # themselves vary like a chi over d dims, ~1/sqrt(2d) = 4.4% between rows
            ratio = norms / sel.std(dim=-1)
            assert abs(ratio.mean().item() / math.sqrt(d - 1) - 1) < 0.01
            assert ratio.std().item() / ratio.mean().item() < 0.01
            assert 0.02 < norms.std().item() / norms.mean().item() < 0.08


def test_switchhead_rejects_an_unknown_selector_init() -> None:
    with pytest.raises(ValueError, match="selector_init"):
        SwitchHeadAttention(64, 2, 32, 4, selector_init="equal")


@pytest.mark.parametrize(("init", "std"), [("gpt2", 0.02), ("fan_in", 1 / math.sqrt(400))])
def test_token_embedding_std(init: str, std: float) -> None:
    torch.manual_seed(0)
    emb = TokenEmbedding(2048, 400, init=init)  # 819200 entries: std within 0.5%
    assert abs(emb.tok.weight.std().item() / std - 1) < 0.005
    assert abs(emb.tok.weight.mean().item()) < 0.01 * std


def test_moeut_specs_follow_the_authors_init() -> None:
    """The tiny MoEUT (d = 64) builds with std 1/8 embeddings and per-row-std selectors;
    the GPT tiny spec keeps GPT-2's 0.02. Parameter counts do not depend on either."""
    torch.manual_seed(0)
    plan = blockdsl.check(ROOT / "specs/tiny/moeut.block")
    assert plan.stem[1]["init"] == "fan_in"
    model = blockdsl.build(plan, device="cpu")
    w = model.stem.tok.weight  # 256 x 64
    assert abs(w.std().item() * 8 - 1) < 0.03
    att = [m for m in model.modules() if isinstance(m, SwitchHeadAttention)]
    assert att and all(m.selector_init == "row_std" for m in att)
    gpt = blockdsl.check(ROOT / "specs/tiny/gpt.block")
    assert gpt.stem[1]["init"] == "gpt2"
