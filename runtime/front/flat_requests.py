"""A quick path for flat requests. Pure.

Validating a request with the models of request_model.py costs microseconds when warm, and
several times that on a front that serves requests spaced out (the validator's code and the
schemas are out of the CPU's caches by the next request: benchmarks/README.md). Most
requests are flat: a handful of parameters, each a number, string or boolean. For those, a
check derived from the same models (their types and bounds, nothing written twice) says
whether the body fits; anything it cannot tell, or finds wrong, goes to the models, which
then name the error. It may only ever say "fits" where the models do:
tests/unit/test_flat_requests.py holds it to that over generated bodies.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Annotated, Any, get_args, get_origin

import annotated_types
from pydantic import BaseModel

from runtime.front.request_model import MODELS

_BOUNDS: dict[type, tuple[Callable[[Any, Any], bool], str]] = {
    annotated_types.Ge: (operator.ge, "ge"),
    annotated_types.Gt: (operator.gt, "gt"),
    annotated_types.Le: (operator.le, "le"),
    annotated_types.Lt: (operator.lt, "lt"),
}
# A field's check: the exact types its value may have, and the bounds it must be within
# (a string's bound is on its length).
_Check = tuple[tuple[type, ...], tuple[tuple[Callable[[Any, Any], bool], Any], ...]]


def _scalar_check(annotation: Any) -> _Check | None:
    """The check of an optional number, string or boolean field; None for any other kind.
    `Any` fields (limits.py checks them) accept every value."""
    if annotation is Any:
        return (object,), ()
    args = [a for a in get_args(annotation) if a is not type(None)]
    if len(args) != 1:
        return None
    inner, metadata = args[0], []
    if get_origin(inner) is Annotated:
        inner, *extra = get_args(inner)
        for info in extra:
            metadata += getattr(info, "metadata", [info])
    kinds = {bool: (bool,), int: (int,), float: (float, int), str: (str,)}.get(inner)
    if kinds is None:
        return None
    bounds = []
    for item in metadata:
        if isinstance(item, annotated_types.MaxLen) and inner is str:
            bounds.append((operator.le, item.max_length))  # on the length (fits_flat)
        elif type(item) in _BOUNDS and inner is not str:
            compare, attribute = _BOUNDS[type(item)]
            bounds.append((compare, getattr(item, attribute)))
        else:
            return None  # a constraint this quick path does not know: the models decide
    compares = {compare for compare, _limit in bounds}
    below, above = compares & {operator.ge, operator.gt}, compares & {operator.le, operator.lt}
    if inner is float and not (below and above):
        # Not bounded both ways: an integer too large for a float (the models refuse it)
        # would pass here. Integers there are left to the models.
        kinds = (float,)
    return kinds, tuple(bounds)


def _scalar_checks(model: type[BaseModel]) -> dict[str, _Check] | None:
    """The checks of a model's number, string and boolean fields, by parameter name; None
    where the quick path cannot speak for the model: a required field (a chat request's
    `messages`: never flat) or a check of the whole model. A field with a validator of its
    own is left to the model."""
    fields, decorators = model.model_fields, model.__pydantic_decorators__
    if decorators.model_validators or any(field.is_required() for field in fields.values()):
        return None
    validated = {name for v in decorators.field_validators.values() for name in v.info.fields}
    return {
        field.alias or name: check
        for name, field in fields.items()
        if name not in validated and (check := _scalar_check(field.annotation)) is not None
    }


_SCALARS = {route: _scalar_checks(model) for route, model in MODELS.items()}


def fits_flat(route: bytes, body: dict[str, Any]) -> bool:
    """True when `body` is known to fit its route's model: every parameter a number, string
    or boolean (or null) of its field's exact type, within its bounds. False means only
    "ask the model" (MODELS[route].model_validate), never that the body is wrong."""
    checks = _SCALARS[route]
    if checks is None:
        return False
    for name, value in body.items():
        check = checks.get(name)
        if check is None:
            return False
        if value is None:
            continue
        kinds, bounds = check
        if kinds[0] is not object:
            if type(value) not in kinds:
                return False
            measured = len(value) if kinds[0] is str else value
            for compare, limit in bounds:
                if not compare(measured, limit):
                    return False
    return True
