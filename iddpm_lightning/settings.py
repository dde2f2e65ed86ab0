"""The types of every setting, and one check of them for Python callers.

jsonargparse reads the type hints of the classes' ``__init__`` (module, data, callbacks) and
refuses a bad value at parse time with one line naming the key; ``--print_config`` and
``--help`` show the types. The restricted types of ``jsonargparse.typing`` are subclasses of
``int``/``float``/``str``, so plain numbers and strings are accepted as they are.

``check_args`` applies the same hints to the arguments of a direct Python call (tests,
notebooks, a script), so that there is one description of each setting and no hand-written
range checks: a failure is a ConfigError of one sentence naming the setting and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import operator
import re
import typing
from typing import Any, Callable, Literal, Union

from jsonargparse.typing import (  # noqa: F401  (re-exported: the types the classes use)
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
    restricted_string_type,
)

from .errors import ConfigError

NoiseSchedule = Literal["cosine", "linear"]
VarianceType = Literal["learned_range", "fixed_small", "fixed_large"]
LossType = Literal["hybrid", "vlb", "simple"]
Features = Literal["inception", "digits"]  # the feature space of sample-quality metrics

# [0, 1): a dropout of 1 zeroes every activation, an EMA decay of 1 never moves.
UnitIntervalOpenRight = restricted_number_type("UnitIntervalOpenRight", float, [(">=", 0), ("<", 1)])
# Sample-quality metrics: precision/recall compare each sample with its k = 3 nearest other samples.
MetricSampleCount = restricted_number_type("MetricSampleCount", int, (">=", 4))

# A respacing written as text, as ``space_timesteps`` reads it: a count ("100"), section counts
# ("10,15,25") or a DDIM stride ("ddim50"), every count a positive integer.
_COUNT = r" *0*[1-9][0-9]* *"
RESPACING_PATTERN = rf"^(?: *ddim{_COUNT}|{_COUNT}(?:,{_COUNT})*)$"
Respacing = restricted_string_type(
    "Respacing", RESPACING_PATTERN,
    docstring="A respacing: a count like '100', section counts like '10,15,25', or a DDIM stride like 'ddim50'.",
)
# A sampler's steps: a positive number of steps, a respacing string, or null for all T steps.
SampleSteps = Union[PositiveInt, Respacing, None]

_SYMBOLS = {operator.gt: ">", operator.ge: ">=", operator.lt: "<", operator.le: "<="}


def check_args(owner: str, function: Callable, values: dict[str, Any]) -> None:
    """Check each of ``values`` that ``function`` annotates against its type hint; ``owner``
    prefixes the setting's name as a user writes it (``"model."``, ``"FID "``)."""
    hints = _hints(function)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is not None and not _conforms(value, hint):
            what, fix = _describe(hint)
            raise ConfigError(f"{owner}{name}={value!r} {what}; set it to {fix}")


@functools.cache
def _hints(function: Callable) -> dict[str, Any]:
    return typing.get_type_hints(function)


def _restrictions(hint) -> list | None:
    return getattr(hint, "_restrictions", None) if isinstance(hint, type) else None


def _conforms(value, hint) -> bool:
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args
    if origin is Union or type(hint).__name__ == "UnionType":
        return any(_conforms(value, arg) for arg in args)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_conforms(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is Respacing:
        return isinstance(value, str) and re.match(RESPACING_PATTERN, value) is not None
    restrictions = _restrictions(hint)
    if restrictions is not None:
        kind = numbers.Integral if issubclass(hint, int) else numbers.Real
        return (isinstance(value, kind) and not isinstance(value, bool)
                and all(op(value, bound) for op, bound in restrictions))
    if dataclasses.is_dataclass(hint):  # a settings object (Sampler, UNetConfig): itself, not its name
        return isinstance(value, hint)
    return True  # str, paths, modules: nothing to check beyond what their use checks


def _describe(hint) -> tuple[str, str]:
    """(what a value must be, how to fix it), for the error sentence."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return f"is not one of {', '.join(map(repr, args))}", "one of them"
    if Respacing in args:
        return ("is not a respacing", "a positive number of steps like 100, section counts like '10,15,25', a DDIM "
                                      "stride like 'ddim50', or null for all steps")
    if origin is Union or type(hint).__name__ == "UnionType":
        return _describe(next(a for a in args if a is not type(None)))
    if origin in (list, tuple):
        what, fix = _describe(args[0])
        return f"must be a list whose every item {what.removeprefix('must be ')}", f"a list of items each {fix}"
    if hint is bool:
        return "must be true or false", "one of them"
    if dataclasses.is_dataclass(hint):
        return f"is not a {hint.__name__}", f"{hint.__name__}(...) (in a config: its fields, e.g. name: and steps:)"
    restrictions = _restrictions(hint) or []
    if issubclass(hint, int):
        minimum = min(b + (op is operator.gt) for op, b in restrictions)
        return f"must be an integer >= {minimum}", f"a whole number of at least {minimum}"
    bounds = dict((_SYMBOLS[op], b) for op, b in restrictions)
    low = next(((s, b) for s, b in bounds.items() if s in (">", ">=")), None)
    high = next(((s, b) for s, b in bounds.items() if s in ("<", "<=")), None)
    if low and high:
        interval = f"{'[' if low[0] == '>=' else '('}{low[1]}, {high[1]}{']' if high[0] == '<=' else ')'}"
        return f"must be a number in {interval}", f"a value in {interval}"
    s, b = low or high
    return f"must be a number {s} {b}", f"a value {s} {b}"


# Precisions that convert the whole module, weights and EMA included, to a 16-bit dtype:
# an EMA step of (1 - 0.9999)·(θ - ema) is below bfloat16's resolution, so the average
# would never move, and AdamW's small updates round away the same way.
HALF_TRUE_PRECISIONS = ("bf16-true", "16-true")


def check_precision(precision: str) -> None:
    """Refuse a ``trainer.precision`` that would train the weights themselves in 16 bits."""
    if str(precision) in HALF_TRUE_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision} converts the weights and their EMA to 16 bits, where the EMA "
            f"(decay 0.9999) and AdamW's small steps round to no change; use trainer.precision=bf16-mixed "
            f"(float32 weights, the UNet in bfloat16) or 32-true"
        )
