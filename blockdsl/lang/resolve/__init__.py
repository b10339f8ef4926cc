"""Resolve: IR + (optional) choice assignment -> a concrete Plan of layer instances.

Binds search choices, evaluates variables (lazily, so a derived model's overrides reach
everything that depends on them), expands `repeat`, groups and patterns, fills argument
defaults, checks every argument, and decides which parameter group each instance owns
or shares. Everything it rejects is a located `BlockError`. No torch.

One module per phase, run in this order by `resolve()` (the order fixes which error is
reported first and in which order search choices are asked for):

- `merge`: the model's `extends` chain flattened;
- `io`: width, stem, head and norms;
- `layout`: repeats, groups, slots, patterns and overrides expanded into instances;
- `instances`: each instance's primitive, arguments and norms; sharing checked;
- `altup`: the AltUp widening;
and `args` binds any call's arguments for all of them. Expressions are evaluated by the
one evaluator in `blockdsl.lang.expr`, which the search uses too.
"""

from __future__ import annotations

from typing import Any

from blockdsl.lang import ir
from blockdsl.lang.errors import BlockError
from blockdsl.lang.expr import Chooser, Scope, first_option
from blockdsl.lang.resolve.altup import bind_altup
from blockdsl.lang.resolve.instances import MAX_PARAMS, bind_instances, too_many_params
from blockdsl.lang.resolve.io import bind_io
from blockdsl.lang.resolve.layout import expand_layout
from blockdsl.lang.resolve.merge import merge_model, merged
from blockdsl.plan import Plan
from blockdsl.primitives import head_params, stem_params

__all__ = ["merged", "resolve"]


def resolve(
    module: ir.Module,
    model: str | None = None,
    assignment: dict[str, Any] | None = None,
    chooser: Chooser | None = None,
) -> Plan:
    """Resolve one model of `module` (default: the last one its own file defines).

    `assignment` binds choices by name; `chooser` is asked for any choice not in it
    (the search passes Optuna's suggest here); without either, a choice takes its first
    option.
    """
    if model is None:
        if not module.own_models:
            raise BlockError(f"{module.file} defines no model", None, "add `model NAME { ... }`")
        model = module.own_models[-1]
    m = merge_model(module, model, None)
    bound = dict(assignment or {})
    scope = Scope(m["assigns"], chooser or first_option, bound)
    io = bind_io(m, model, scope)
    units = expand_layout(m, model, scope)
    layers, stored = bind_instances(units, scope, io)
    # After the layers, so an argument error in a layer (e.g. heads) is reported first.
    stored += stem_params(io.stem_call.name, io.stem_args, io.d) + head_params(
        io.head_call.name, io.head_args, io.d, io.stem_args.get("vocab", 0)
    )
    if stored > MAX_PARAMS:
        too_many_params(stored, io.stem_call.span, "the stem and head")
    altup = bind_altup(m.get("altup"), scope, len(units))
    variables = scope.settled()
    return Plan(
        name=model,
        file=module.file,
        d=io.d,
        task=io.task,
        seq=io.seq,
        stem=(io.stem_call.name, io.stem_args),
        head=(io.head_call.name, io.head_args),
        final_norm=io.final_norm,
        altup=altup,
        layers=tuple(layers),
        n_units=len(units),
        variables=variables,
        assignment=dict(bound),
        choices=tuple(scope.defs.values()),
        span=m["model"].span,
        default_norm=io.default_norm,
    )
