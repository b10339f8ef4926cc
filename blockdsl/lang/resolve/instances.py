"""Phase 3 of resolve: each sublayer instance bound to a primitive, arguments and norms.

Per instance, in stack order: pick the primitive (a choice, or an override replacing it),
evaluate its arguments with overrides applied, check them, count its parameter group's
parameters once, attach its norms, and check that instances sharing a parameter group
(share=, norm_share=, groups=) agree on its shape. Torch-free.
"""

from __future__ import annotations

from typing import Any

from blockdsl.lang import ir
from blockdsl.lang.errors import BlockError, did_you_mean
from blockdsl.lang.expr import Scope
from blockdsl.lang.resolve.args import bind_args
from blockdsl.lang.resolve.io import BoundIO
from blockdsl.lang.resolve.layout import Instance
from blockdsl.names import NORM_KINDS, NORMS_PER_PLACEMENT
from blockdsl.plan import LayerPlan, NormPlan
from blockdsl.primitives import NORMS, PLACEMENTS, PRIMITIVES, ArgError, Primitive

# Stored parameters of one model: ~500x the largest models trained so far. Every size is
# a bounded integer, but their products are not: d_ff=2**62 is a "valid" 3e20-parameter
# layer. Past this a spec is a typo, and lowering it would only exhaust memory.
MAX_PARAMS = 10**15


def too_many_params(n: int, span: ir.Span, where: str) -> None:
    raise BlockError(
        f"the model has more than 10**15 parameters (about {n:.1e} with {where})",
        span,
        "a size is probably a typo: the largest models trained so far have ~2e12",
    )


def bind_instances(
    units: list[list[Instance]], scope: Scope, io: BoundIO
) -> tuple[list[LayerPlan], int]:
    """The layers of `units`, and their stored parameters (each parameter group once)."""
    binder = _Binder(scope, io)
    for u, unit in enumerate(units):
        for inst in unit:
            binder.bind(u, inst)
    return binder.layers, binder.stored


class _Binder:
    """Binds instances one by one; remembers each parameter group's first shape and user."""

    def __init__(self, scope: Scope, io: BoundIO):
        self.scope = scope
        self.io = io
        self.layers: list[LayerPlan] = []
        self.stored = 0  # stored parameters of the layers so far (capped at MAX_PARAMS)
        self.norm_sigs: dict[str, tuple[tuple, ir.Span]] = {}
        self.prim_sigs: dict[str, tuple[tuple, ir.Span]] = {}

    def bind(self, u: int, inst: Instance) -> None:
        it = inst.item
        call = self._call(inst)
        prim = PRIMITIVES.get(call.name)
        if prim is None:
            known = list(PRIMITIVES)
            raise BlockError(
                f"unknown primitive '{call.name}'",
                call.span,
                did_you_mean(call.name, known),
            )
        extra = self._field_overrides(inst, call, prim)
        key = f"share:{it.share}" if it.share else inst.key_base
        args = self._args(inst, call, prim, extra)
        if key not in self.prim_sigs:  # a parameter group's first use: count it once
            self.stored += prim.params(self.io.ctx, args)
            if self.stored > MAX_PARAMS:
                too_many_params(self.stored, call.span, f"{inst.block}[{inst.repeat}].{it.label}")
        placement, norms = self._norms(inst, prim)
        layer = LayerPlan(
            index=len(self.layers),
            unit=u,
            block=inst.block,
            repeat=inst.repeat,
            label=it.label,
            prim=call.name,
            family=prim.family,
            args=args,
            placement=placement,
            norms=norms,
            key=key,
            span=call.span,
        )
        self._check_sharing(layer, it)
        self.layers.append(layer)

    def _call(self, inst: Instance) -> ir.Call:
        """The instance's primitive call: forced, chosen among `{a | b}`, or overridden."""
        it = inst.item
        call = inst.forced or it.prims[0]
        if inst.forced is None and len(it.prims) > 1:
            names = [p.name for p in it.prims]
            if len(set(names)) != len(names):
                raise BlockError("a primitive choice lists one primitive twice", it.span)
            cname = f"{inst.block}.{it.label}"
            picked = self.scope.choice(
                ir.Choice.model_construct(
                    options=tuple(
                        ir.ChoiceOption.model_construct(
                            value=ir.Str.model_construct(value=p.name, span=p.span), span=p.span
                        )
                        for p in it.prims
                    ),
                    span=it.choice_span or it.span,
                ),
                cname,
            )
            call = next(p for p in it.prims if p.name == picked)
        for ov in inst.overrides:
            if ov.field is None:
                if not isinstance(ov.value, ir.Call):
                    raise BlockError(
                        f"`at ...: {ov.target} = ...` replaces the primitive and needs a call",
                        ov.span,
                        f"write {ov.target} = mlp(...), or {ov.target}.ARG = value",
                    )
                call = ov.value
        return call

    def _field_overrides(
        self, inst: Instance, call: ir.Call, prim: Primitive
    ) -> dict[str, tuple[Any, ir.Span]]:
        """`at i: label.ARG = value` overrides, evaluated: ARG -> (value, span)."""
        extra: dict[str, tuple[Any, ir.Span]] = {}
        for ov in inst.overrides:
            if ov.field is not None:
                if ov.field not in prim.args:
                    raise BlockError(
                        f"{call.name} has no argument '{ov.field}'",
                        ov.span,
                        did_you_mean(ov.field, prim.args),
                    )
                if isinstance(ov.value, ir.Call):
                    raise BlockError("an argument override takes a value, not a call", ov.span)
                name = f"{inst.block}.{inst.item.label}.{ov.field}"
                extra[ov.field] = (self.scope.eval(ov.value, name), ov.span)
        return extra

    def _args(
        self, inst: Instance, call: ir.Call, prim: Primitive, extra: dict[str, tuple[Any, ir.Span]]
    ) -> dict[str, Any]:
        """The primitive's arguments bound and checked against the model's context."""
        ctx = self.io.ctx
        args, spans = bind_args(
            call,
            prim.args,
            self.scope,
            f"primitive {call.name}",
            ctx,
            extra,
            choice_prefix=f"{inst.block}.{inst.item.label}.",
        )
        if ctx.causal and args.get("causal") is False:
            raise BlockError(
                "causal=false in a language model lets each position see the token it must predict",
                spans.get("causal", call.span),
                "language models train on next-token prediction; drop causal=false",
            )
        try:
            prim.check(ctx, args)
        except ArgError as err:
            raise BlockError(str(err), spans.get(err.arg or "", call.span), err.hint) from None
        return args

    def _norms(self, inst: Instance, prim: Primitive) -> tuple[str, tuple[NormPlan, ...]]:
        """The instance's norm placement and norms (none, one, or two for sandwich)."""
        it = inst.item
        nopt = it.norm
        placement = nopt.placement if nopt else "pre"
        if placement not in PLACEMENTS:
            raise BlockError(
                f"unknown norm placement '{placement}'",
                nopt.span if nopt else it.span,
                did_you_mean(placement, PLACEMENTS),
            )
        default_norm = self.io.default_norm
        if nopt and nopt.kind:
            if nopt.kind not in NORMS or nopt.kind == "none":
                raise BlockError(
                    f"unknown norm kind '{nopt.kind}'",
                    nopt.span,
                    did_you_mean(nopt.kind, NORM_KINDS),
                )
            nkind, nargs = nopt.kind, {k: s.default for k, s in NORMS[nopt.kind].items()}
            if nopt.kind == default_norm[0]:
                nargs = default_norm[1]
        else:
            nkind, nargs = default_norm
        if placement == "peri" and not prim.x_norm:
            # peri-norm only feeds projections followed by softmax/sigmoid (the router, a
            # selector, attention scores): a primitive that has none reads no norm
            n_norms = 0
        else:
            n_norms = NORMS_PER_PLACEMENT[placement]
        nbase = f"normshare:{it.norm_share}" if it.norm_share else f"{inst.norm_base}.norm"
        return placement, tuple(NormPlan(nkind, nargs, f"{nbase}{j}") for j in range(n_norms))

    def _check_sharing(self, layer: LayerPlan, it: ir.Sublayer) -> None:
        """A sharing group's members must agree, or there is no one module to share."""
        key, call_span = layer.key, layer.span
        sig = layer.signature()
        if key in self.prim_sigs and self.prim_sigs[key][0] != sig:
            first = self.prim_sigs[key][1]
            how = f"share={it.share}" if it.share else "the same copy of a grouped repeat (groups=)"
            raise BlockError(
                f"sublayers sharing weights through {how} disagree: "
                f"{_sig_text(sig)} here vs {_sig_text(self.prim_sigs[key][0])} at {first}",
                call_span,
                "shared weights need one shape: give them the same arguments"
                + (
                    ", or different share= names"
                    if it.share
                    else ", or override all repeats of a copy alike"
                ),
            )
        self.prim_sigs.setdefault(key, (sig, call_span))
        nopt = it.norm
        for nrm in layer.norms:
            nsig = nrm.signature()
            if nrm.key in self.norm_sigs and self.norm_sigs[nrm.key][0] != nsig:
                group = it.norm_share or nrm.key
                raise BlockError(
                    f"norms sharing '{group}' disagree: {nsig[0]} here vs "
                    f"{self.norm_sigs[nrm.key][0][0]} at {self.norm_sigs[nrm.key][1]}",
                    nopt.span if nopt else it.span,
                    "a shared norm is one module: give its users the same norm kind, "
                    "or a different norm_share= name",
                )
            self.norm_sigs.setdefault(nrm.key, (nsig, it.span))


def _sig_text(sig: tuple) -> str:
    prim, args = sig
    return f"{prim}(" + ", ".join(f"{k}={v}" for k, v in args) + ")"
