"""Stems (tokens or images to vectors) and heads (vectors to logits)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_INIT_STD = 0.02  # GPT-2 / ViT convention for embeddings and positions


class TokenEmbedding(nn.Module):
    """Token embedding plus optional learned absolute positions (GPT-2 style).

    Params: vocab*d + (max_len*d if max_len). Models with RoPE pass max_len=None.
    `init` picks the token table's std: "gpt2" is GPT-2's 0.02; "fan_in" is 1/sqrt(d), what
    MoEUT's code uses (Kaiming fan-in, linear gain). Why it matters: with peri-norm, V and
    the experts read the raw residual, so the embedding's scale sets how training starts
    (at d = 412: 0.049 vs 0.020). Positions keep 0.02 either way.
    """

    def __init__(
        self, vocab: int, d: int, max_len: int | None = None, dropout: float = 0.0,
        init: str = "gpt2",
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.dropout = dropout
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d) if max_len else None
        if init not in ("gpt2", "fan_in"):
            raise ValueError(f"unknown embedding init {init!r}; expected gpt2 or fan_in")
        nn.init.normal_(self.tok.weight, std=_INIT_STD if init == "gpt2" else d**-0.5)
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=_INIT_STD)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.tok(tokens)
        if self.pos is not None:
            t = tokens.shape[-1]
            if t > self.pos.num_embeddings:
                raise ValueError(
                    f"sequence of {t} tokens is longer than max_len={self.pos.num_embeddings}"
                )
            x = x + self.pos.weight[:t]
        return F.dropout(x, self.dropout, self.training)


class PatchEmbedding(nn.Module):
    """ViT stem: non-overlapping patches projected by a strided conv, class token, positions.

    Params: channels*patch^2*d + d (proj) + d (learned cls) + num_tokens*d (learned pos).
    cls="zero" is a constant zero token, as in WideNet's released code, so it adds none.
    """

    def __init__(
        self,
        image: int,
        patch: int,
        channels: int,
        d: int,
        cls: str = "learned",
        pos: str = "learned",
    ) -> None:
        super().__init__()
        if image % patch:
            raise ValueError(f"image size {image} is not a multiple of patch size {patch}")
        if cls not in ("learned", "zero", "none"):
            raise ValueError(f"cls must be 'learned', 'zero' or 'none', not {cls!r}")
        if pos not in ("learned", "none"):
            raise ValueError(f"pos must be 'learned' or 'none', not {pos!r}")
        self.image, self.patch = image, patch
        self.has_cls = cls != "none"
        self.num_tokens = (image // patch) ** 2 + (1 if self.has_cls else 0)
        self.proj = nn.Conv2d(channels, d, patch, stride=patch, bias=True)
        self.cls: Tensor | None
        if cls == "learned":
            self.cls = nn.Parameter(torch.zeros(1, 1, d))
            nn.init.normal_(self.cls, std=1e-6)  # ViT's big_vision: near zero
        elif cls == "zero":
            self.register_buffer("cls", torch.zeros(1, 1, d), persistent=False)
        else:
            self.cls = None
        self.pos: nn.Parameter | None = None
        if pos == "learned":
            self.pos = nn.Parameter(torch.empty(1, self.num_tokens, d))
            nn.init.normal_(self.pos, std=_INIT_STD)

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.image, self.image):
            raise ValueError(
                f"expected {self.image}x{self.image} images, got {tuple(images.shape[-2:])}"
            )
        x = self.proj(images).flatten(2).transpose(1, 2)  # [B, N, d]
        if self.cls is not None:
            x = torch.cat((self.cls.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        if self.pos is not None:
            x = x + self.pos.to(x.dtype)
        return x


class LMHead(nn.Module):
    """Vocabulary logits; tied to an embedding it owns no weight, only the optional bias.

    Params: (0 if tied else vocab*d) + (vocab if bias). The tied embedding is held as a
    plain reference, not a submodule, so the head's own `parameters()` never count it;
    it is registered where it belongs, in the stem.
    """

    tied: nn.Embedding | None

    def __init__(
        self, d: int, vocab: int, bias: bool = False, tied: nn.Embedding | None = None
    ) -> None:
        super().__init__()
        self.proj: nn.Linear | None = None
        self.bias: nn.Parameter | None = None
        if tied is not None:
            if tuple(tied.weight.shape) != (vocab, d):
                raise ValueError(
                    f"tied embedding is {tuple(tied.weight.shape)}, head needs ({vocab}, {d})"
                )
            object.__setattr__(self, "tied", tied)
            if bias:
                self.bias = nn.Parameter(torch.zeros(vocab))
        else:
            object.__setattr__(self, "tied", None)
            self.proj = nn.Linear(d, vocab, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.tied is None:
            assert self.proj is not None
            return self.proj(x)
        return F.linear(x, self.tied.weight, self.bias)


class ClassifierHead(nn.Module):
    """Pool tokens, optional tanh pre-logits layer, then class logits.

    Params: (d*pre_logits + pre_logits if pre_logits) + (pre_logits or d)*classes + classes.
    """

    def __init__(
        self,
        d: int,
        classes: int,
        pool: str = "cls",
        pre_logits: int | None = None,
        has_cls_token: bool = True,
    ) -> None:
        super().__init__()
        if pool not in ("cls", "gap"):
            raise ValueError(f"pool must be 'cls' or 'gap', not {pool!r}")
        if pool == "cls" and not has_cls_token:
            raise ValueError("pool='cls' needs a class token; use pool='gap'")
        self.pool, self.has_cls_token = pool, has_cls_token
        self.pre = nn.Linear(d, pre_logits) if pre_logits else None
        self.fc = nn.Linear(pre_logits or d, classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.pool == "cls":
            h = x[:, 0]
        else:
            h = (x[:, 1:] if self.has_cls_token else x).mean(dim=1)
        if self.pre is not None:
            h = torch.tanh(self.pre(h))
        return self.fc(h)
