"""The one expression evaluator (blockdsl.lang.expr) and the Plan's derived facts.

The evaluator is shared by the resolver and the search's training variables: these
tests pin that the search gets the same range checks and choice values as the model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import blockdsl
from blockdsl.lang.errors import BlockError
from blockdsl.lang.expr import ChoiceDef, Scope, eval_expr, first_option

SPACE = """
model base {
  d = 32
  stem tokens(vocab=64, context=16)
  head lm()
  block cell {
    attn mha(heads=2)
    ffn mlp()
  }
  repeat 2 cell
}
space s extends base {
  d = {32 | 64}
  LR
  baseline base
  minimize val_loss
}
"""


def _space(tmp_path: Path, lr: str):
    from blockdsl import search as S  # the search imports optuna: only where needed

    p = tmp_path / "s.block"
    p.write_text(SPACE.replace("LR", lr))
    return S, S.load_space(p)


def test_eval_expr_binds_numeric_variables() -> None:
    e = blockdsl.load("x = 2 * baseline + 1\n").assigns[0].value
    assert eval_expr(e, {"baseline": 3}) == 7
    assert eval_expr(e, {"baseline": 0.5}) == 2.0


def test_scope_records_choices_in_the_order_met() -> None:
    module = blockdsl.load("a = {1 | 2}\nb = a * {3 .. 9 step 3}\n")
    assigns = {x.name: x for x in module.assigns}
    asked: list[ChoiceDef] = []
    scope = Scope(assigns, lambda c: asked.append(c) or first_option(c), {})
    assert scope.var("b", assigns["b"].span) == 3
    assert [c.name for c in asked] == ["a", "b"]
    assert asked[1].kind == "int" and (asked[1].lo, asked[1].hi, asked[1].step) == (3, 9, 3)


def test_training_variables_read_the_plans_choice_values(tmp_path: Path) -> None:
    S, sp = _space(tmp_path, "lr = 1e-5 * d")
    plan = sp.resolve(assignment={"d": 64})
    assert S.bind_train_variables(sp, plan) == {"lr": pytest.approx(64e-5)}


@pytest.mark.parametrize("lr, message", [
    ("lr = {1e-2 .. 1e-4 log}", "empty range"),
    ("lr = {0 .. 1e-2 log}", "a log range needs a positive low end"),
    ("lr = {1e-3 | 1e-3}", "a choice lists the same option twice"),
])
def test_training_variables_are_range_checked_like_the_model(tmp_path: Path, lr: str, message: str) -> None:
    S, sp = _space(tmp_path, lr)
    plan = sp.resolve()
    with pytest.raises(BlockError, match=message):
        S.bind_train_variables(sp, plan)


def test_plan_io_of_a_language_model_and_a_classifier() -> None:
    lm = blockdsl.resolve(SPACE.replace("LR", ""), "base")
    assert lm.io.task == "lm" and lm.io.vocab == 64 and lm.io.seq == 16
    assert lm.io.width == lm.io_width == 32 and lm.io.classes is None and lm.image_size is None
    vit = blockdsl.resolve(Path(__file__).parent.parent / "specs" / "vit-b16.block")
    assert (vit.image_size, vit.channels, vit.num_classes) == (224, 3, 1000)
    assert vit.io.image_size == 224 and vit.io.patch == 16 and vit.io.vocab is None
