"""The four seed papers: published parameter counts, and the tiny variants train a step."""

from __future__ import annotations

import pytest
import torch

import blockdsl

# (spec, paper figure in millions, how the paper rounds)
PAPER = [
    # WideNet, ImageNet-1K table: figures truncated to whole millions.
    ("specs/widenet.block", 29, "trunc"),
    ("specs/widenet/widenet-l.block", 40, "trunc"),
    ("specs/widenet/widenet-h.block", 63, "trunc"),
    ("specs/widenet/vit-b.block", 87, "trunc"),
    ("specs/widenet/vit-l.block", 305, "trunc"),
    ("specs/widenet/vit-moe-b.block", 128, "trunc"),
    ("specs/widenet/vit-moe-l.block", 406, "trunc"),
    # MoEUT: size labels round the unique-parameter count.
    ("specs/moeut.block", 44, "round"),
    ("specs/moeut/moeut-126M.block", 126, "round"),
    ("specs/moeut/moeut-318M.block", 318, "round"),
    ("specs/moeut/moeut-727M.block", 727, "round"),
    ("specs/moeut/moeut-1B.block", 1040, "round"),  # "1B"
]


@pytest.mark.parametrize("path,millions,how", PAPER, ids=[p[0] for p in PAPER])
def test_published_parameter_counts(path: str, millions: int, how: str) -> None:
    n = blockdsl.report(path).stored_params / 1e6
    got = int(n) if how == "trunc" else round(n)
    assert got == millions, f"{path}: {n:.3f}M"


def test_moeut_244m_is_within_a_third_of_a_percent_of_its_label() -> None:
    # The published 244M config gives 243.33M with the architecture that reproduces the
    # other five sizes exactly; documented in the README and the spec.
    n = blockdsl.report("specs/moeut/moeut-244M.block").stored_params
    assert n == 243_326_784
    assert abs(n / 244e6 - 1) < 0.003


def test_widenet_shares_attention_and_moe_but_not_norms() -> None:
    plan = blockdsl.resolve("specs/widenet.block")
    attn = {la.key for la in plan.layers if la.family == "attn"}
    moe = {la.key for la in plan.layers if la.family == "moe"}
    norms = [n.key for la in plan.layers for n in la.norms]
    assert len(attn) == 1 and len(moe) == 1
    assert len(norms) == len(set(norms)) == 24


def test_moeut_groups_share_everything_in_abab_order() -> None:
    plan = blockdsl.resolve("specs/moeut.block")
    keys = [la.key for la in plan.layers if la.family == "attn"]
    assert len(keys) == 16 and len(set(keys)) == 2
    assert keys[0::2] == [keys[0]] * 8 and keys[1::2] == [keys[1]] * 8
    norm_keys = {n.key for la in plan.layers for n in la.norms}
    assert len(norm_keys) == 4  # one attention LN and one selector LN per unique layer
    assert all(la.placement == "peri" for la in plan.layers)


def test_altup_adds_k_squared_plus_k_per_layer() -> None:
    dense = blockdsl.report("specs/altup.block", model="dense_base").stored_params
    alt = blockdsl.report("specs/altup.block").stored_params
    assert alt - dense == (2 * 2 + 2) * 12


TINY = ["specs/tiny/widenet.block", "specs/tiny/moeut.block", "specs/tiny/altup.block",
        "specs/tiny/brainformer.block", "specs/tiny/gpt.block", "specs/tiny/vit.block"]


@pytest.mark.parametrize("path", TINY)
def test_tiny_seed_trains_one_step(path: str) -> None:
    torch.manual_seed(0)
    model = blockdsl.build(path, device="cpu")
    rep = blockdsl.report(path)
    assert sum(p.numel() for p in model.parameters()) == rep.stored_params
    assert rep.stored_params < 1_000_000
    io = model.io
    if io.task == "lm":
        x = torch.randint(0, io.vocab, (4, 33))
        inputs, target = x[:, :-1], x[:, 1:]
    else:
        inputs = torch.randn(4, io.channels, io.image_size, io.image_size)
        target = torch.randint(0, io.classes, (4,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    out = model(inputs)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, -2), target.flatten())
    total = loss + sum(out.aux.values(), torch.zeros(()))
    total.backward()
    assert torch.isfinite(total)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    opt.step()
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed == len(before)


def test_routed_seeds_report_their_aux_losses() -> None:
    torch.manual_seed(0)
    w = blockdsl.build("specs/tiny/widenet.block", device="cpu")
    assert set(w(torch.randn(2, 1, 8, 8)).aux) == {"balance"}
    m = blockdsl.build("specs/tiny/moeut.block", device="cpu")
    aux = m(torch.randint(0, 256, (2, 16))).aux
    assert set(aux) == {"entropy_ffn", "entropy_attn"}
    # an entropy *bonus*: the regulariser is -weight * H, so it is negative
    assert aux["entropy_ffn"].item() < 0 and aux["entropy_attn"].item() < 0


ALT = """
model dense {
  d = 32
  stem tokens(vocab=64, context=16, pos=rope)
  head lm(tie=true)
  block layer {
    attn mha(heads=4) norm=pre
    ffn  mlp(d_ff=64) norm=pre
  }
  repeat 3 layer
}
model alt extends dense { altup altup(k=K, mode=MODE) }
"""


def test_altup_k1_equals_the_wrapped_model_exactly() -> None:
    text = ALT.replace("K", "1").replace("MODE", "recycled")
    torch.manual_seed(0)
    dense = blockdsl.build(text, model="dense", device="cpu")
    alt = blockdsl.build(text, model="alt", device="cpu")
    # copy the dense weights into the AltUp model (it wraps the same layer modules)
    state = {k.replace("units.", "altup.layers.", 1): v for k, v in dense.state_dict().items()}
    missing, unexpected = alt.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) == {"altup.predict", "altup.correct"}
    x = torch.randint(0, 64, (2, 16))
    assert torch.equal(alt(x).logits, dense(x).logits)


def test_altup_wide_mode_widens_embedding_and_head() -> None:
    text = ALT.replace("K", "2").replace("MODE", "wide")
    rep = blockdsl.report(text, model="alt")
    dense = blockdsl.report(text, model="dense")
    # tied embedding/head grows by (K-1)·vocab·d; final norm by (K-1)·2d; plus K²+K per layer
    assert rep.stored_params - dense.stored_params == 64 * 32 + 2 * 32 + 6 * 3
    model = blockdsl.build(text, model="alt", device="cpu")
    assert sum(p.numel() for p in model.parameters()) == rep.stored_params
    assert model(torch.randint(0, 64, (2, 16))).logits.shape == (2, 16, 64)


@pytest.mark.parametrize("path", ["specs/tiny/widenet.block", "specs/tiny/moeut.block",
                                  "specs/tiny/altup.block", "specs/tiny/brainformer.block"])
def test_tiny_seed_learns_on_the_default_data(path: str) -> None:
    """What `blockdsl train specs/tiny/<seed>.block` does, shortened: the val loss falls."""
    from blockdsl.train import TrainConfig, seed_everything, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # robust to a busy machine; see docs/train.md
    try:
        seed_everything(0)
        model = blockdsl.build(path, device="cpu")
        lm = model.io.task == "lm"
        cfg = TrainConfig(steps=30, batch_size=8 if lm else 32, seq_len=32 if lm else None,
                          lr=3e-3, warmup=5, eval_every=30, eval_batches=2 if lm else None,
                          quiet=True, log_every=10)
        r = train(model, cfg)
    finally:
        torch.set_num_threads(threads)
    if lm:
        assert r.val["val_loss"] < r.first_val["val_loss"] - 0.5, (r.first_val, r.val)
    else:
        assert r.val["val_loss"] < r.first_val["val_loss"] - 0.2, (r.first_val, r.val)
        assert r.val["val_acc"] > r.first_val["val_acc"], (r.first_val, r.val)
    assert set(r.aux) == set(model(_example(model)).aux)


def _example(model) -> torch.Tensor:  # noqa: ANN001
    io = model.io
    if io.task == "lm":
        return torch.randint(0, io.vocab, (2, 16))
    return torch.randn(2, io.channels, io.image_size, io.image_size)
