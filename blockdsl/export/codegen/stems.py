"""Standalone source of what is not a registered primitive: stems, heads, norms, the
residual wrapper, the model and the weights reader. Like the primitives' generators, each
reads the live blockdsl module and returns a `Code`."""

from __future__ import annotations

from typing import Any

from torch import nn

from blockdsl.export.codegen import Code

# safetensors is a 8-byte header length, a JSON header, then raw little-endian bytes:
# read with the standard library so the file needs only torch.
READER = '''
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} of a .safetensors file, read without the safetensors package."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        t = torch.frombuffer(bytearray(data[begin:end]), dtype=_DTYPES[info["dtype"]])
        out[name] = t.reshape(info["shape"])
    return out


def load_weights(model, path):
    """Copy a checkpoint into `model`. A tensor shared by several modules (a shared
    layer, a tied head) is stored once under one of its names: each group of names that
    alias one tensor is filled from whichever of them the file holds."""
    tensors = read_safetensors(path)
    groups = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(t.data_ptr(), (t, []))[1].append(name)
    with torch.no_grad():
        for t, names in groups.values():
            found = [n for n in names if n in tensors]
            if not found:
                raise KeyError(f"{path} holds none of {names}")
            t.copy_(tensors[found[0]])
    return model
'''

TOKENS = '''
class TokenEmbedding(nn.Module):
    """Token embedding plus optional learned absolute positions."""

    def __init__(self, vocab, d, max_len):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d) if max_len else None

    def forward(self, tokens):
        x = self.tok(tokens)
        if self.pos is not None:
            x = x + self.pos.weight[: tokens.shape[-1]]
        return x
'''

PATCHES = '''
class PatchEmbedding(nn.Module):
    """ViT stem: strided-conv patches, an optional class token (learned or zero), positions."""

    def __init__(self, image, patch, channels, d, cls, pos):
        super().__init__()
        self.proj = nn.Conv2d(channels, d, patch, stride=patch, bias=True)
        num_tokens = (image // patch) ** 2 + (cls != "none")
        # a zero class token is made in forward, not held as a buffer: loaders that build
        # on the meta device (transformers) never fill a buffer the checkpoint lacks
        self.zero_cls = cls == "zero"
        self.cls = nn.Parameter(torch.zeros(1, 1, d)) if cls == "learned" else None
        self.pos = nn.Parameter(torch.zeros(1, num_tokens, d)) if pos == "learned" else None

    def forward(self, images):
        x = self.proj(images).flatten(2).transpose(1, 2)
        if self.zero_cls:
            x = torch.cat((x.new_zeros(x.shape[0], 1, x.shape[2]), x), dim=1)
        elif self.cls is not None:
            x = torch.cat((self.cls.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        if self.pos is not None:
            x = x + self.pos.to(x.dtype)
        return x
'''

LM_HEAD = '''
class LMHead(nn.Module):
    """Vocabulary logits; tied, it reads the stem's embedding (not a submodule) plus a bias."""

    def __init__(self, d, vocab, bias, tied=None):
        super().__init__()
        object.__setattr__(self, "tied", tied)
        self.proj = None if tied is not None else nn.Linear(d, vocab, bias=bias)
        self.bias = nn.Parameter(torch.zeros(vocab)) if tied is not None and bias else None

    def forward(self, x):
        if self.tied is None:
            return self.proj(x)
        return F.linear(x, self.tied.weight, self.bias)
'''

CLASSIFIER = '''
class ClassifierHead(nn.Module):
    """Pool (class token or mean), optional tanh pre-logits layer, class logits."""

    def __init__(self, d, classes, pool, pre_logits, has_cls_token):
        super().__init__()
        self.pool, self.has_cls_token = pool, has_cls_token
        self.pre = nn.Linear(d, pre_logits) if pre_logits else None
        self.fc = nn.Linear(pre_logits or d, classes)

    def forward(self, x):
        if self.pool == "cls":
            h = x[:, 0]
        else:
            h = (x[:, 1:] if self.has_cls_token else x).mean(dim=1)
        if self.pre is not None:
            h = torch.tanh(self.pre(h))
        return self.fc(h)
'''

NORM = '''
def make_norm(kind, d, eps, bias):
    if kind == "layernorm":
        return nn.LayerNorm(d, eps=eps, bias=bias)
    return nn.RMSNorm(d, eps=eps)
'''

RESIDUAL = '''
class Residual(nn.Module):
    """pre: x + f(N(x)); post: N(x + f(x)); sandwich: x + N2(f(N1(x)));
    peri: x + f(x, x_norm=N(x)); none: x + f(x)."""

    def __init__(self, fn, placement, norms):
        super().__init__()
        self.fn, self.placement = fn, placement
        self.norms = nn.ModuleList(norms)

    def forward(self, x):
        p = self.placement
        if p == "pre":
            return x + self.fn(self.norms[0](x))
        if p == "post":
            return self.norms[0](x + self.fn(x))
        if p == "sandwich":
            return x + self.norms[1](self.fn(self.norms[0](x)))
        if p == "peri" and len(self.norms):
            return x + self.fn(x, x_norm=self.norms[0](x))
        return x + self.fn(x)
'''

ALTUP = '''
class AltUp(nn.Module):
    """AltUp over K blocks [K, B, T, d]: per layer position i, predict all blocks with
    predict[i] (K x K), run the layer on block j = i mod K (alternating) or 0, and correct
    every block by correct[i] times the layer's change."""

    def __init__(self, layers, K, selection):
        super().__init__()
        self.K, self.selection = K, selection
        self.layers = nn.ModuleList(layers)
        self.predict = nn.Parameter(torch.eye(K).repeat(len(self.layers), 1, 1))
        self.correct = nn.Parameter(torch.ones(len(self.layers), K))

    def forward(self, xs):
        K = self.K
        for i, layer in enumerate(self.layers):
            j = i % K if self.selection == "alternating" else 0
            p, g = self.predict[i].to(xs.dtype), self.correct[i].to(xs.dtype)
            x_hat = (p @ xs.reshape(K, -1)).reshape(xs.shape)
            x_tilde = layer(x_hat[j])
            delta = x_tilde - x_hat[j]
            xs = torch.stack([x_tilde + (g[k] - 1) * delta if k == j else x_hat[k] + g[k] * delta
                              for k in range(K)])
        return xs


def widen(x, K, mode):
    """Stem output to [K, B, T, d]: replicated (recycled) or split from K*d (wide)."""
    if mode == "recycled":
        return x.unsqueeze(0).expand(K, *x.shape)
    return x.unflatten(-1, (K, x.shape[-1] // K)).movedim(-2, 0)


def narrow(xs, mode):
    """[K, B, T, d] to the head: summed (recycled) or concatenated (wide)."""
    return xs.sum(dim=0) if mode == "recycled" else xs.movedim(0, -2).flatten(-2)
'''


def stem(m: nn.Module) -> Code:
    if type(m).__name__ == "TokenEmbedding":
        return Code("TokenEmbedding", {"vocab": m.tok.num_embeddings, "d": m.tok.embedding_dim,
                                       "max_len": m.max_len}, (TOKENS,))
    cls = "none" if m.cls is None else ("learned" if isinstance(m.cls, nn.Parameter) else "zero")
    return Code("PatchEmbedding", {
        "image": m.image, "patch": m.patch, "channels": m.proj.in_channels,
        "d": m.proj.out_channels, "cls": cls, "pos": "none" if m.pos is None else "learned",
    }, (PATCHES,))


def head(m: nn.Module) -> Code:
    if type(m).__name__ == "LMHead":
        tied = m.tied is not None
        d, vocab = m.tied.weight.shape[::-1] if tied else (m.proj.in_features, m.proj.out_features)
        bias = m.bias is not None if tied else m.proj.bias is not None
        # `tied` is filled in by the model: the stem's embedding
        return Code("LMHead", {"d": d, "vocab": vocab, "bias": bias, "tied": tied}, (LM_HEAD,))
    return Code("ClassifierHead", {
        "d": m.fc.in_features if m.pre is None else m.pre.in_features,
        "classes": m.fc.out_features, "pool": m.pool,
        "pre_logits": 0 if m.pre is None else m.pre.out_features,
        "has_cls_token": m.has_cls_token,
    }, (CLASSIFIER,))


def norm(m: nn.Module) -> dict[str, Any]:
    """A norm's constructor arguments (they are all LayerNorm or RMSNorm)."""
    if isinstance(m, nn.LayerNorm):
        return {"kind": "layernorm", "d": m.normalized_shape[0], "eps": m.eps,
                "bias": m.bias is not None}
    return {"kind": "rmsnorm", "d": m.normalized_shape[0], "eps": m.eps, "bias": False}
