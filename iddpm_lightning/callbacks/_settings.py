"""The types of the callbacks' settings, and the same checks for Python callers.

jsonargparse reads the type hints of the callbacks' ``__init__`` and refuses a bad value at
parse time with one line naming the key (``--print_config`` and ``--help`` show the types).
``jsonargparse.typing``'s restricted types are subclasses of ``int``/``float``/``str``, so
plain numbers and strings from Python callers are accepted as they are; the ``require_*``
helpers below repeat the checks for callers that construct the callbacks directly, each
failure a ConfigError of one sentence naming the setting and the fix.
"""

from __future__ import annotations

import numbers
import re
from typing import Literal, Union

from jsonargparse.typing import (  # noqa: F401  (re-exported for the callbacks)
    ClosedUnitInterval,
    NonNegativeInt,
    PositiveInt,
    restricted_number_type,
    restricted_string_type,
)

from ..errors import ConfigError

SAMPLERS = ("ddpm", "ddim")
Sampler = Literal["ddpm", "ddim"]

# A respacing written as text, as ``space_timesteps`` reads it: a count ("100"), section counts
# ("10,15,25") or a DDIM stride ("ddim50"), every count a positive integer.
_COUNT = r" *0*[1-9][0-9]* *"
RESPACING_PATTERN = rf"^(?: *ddim{_COUNT}|{_COUNT}(?:,{_COUNT})*)$"
Respacing = restricted_string_type(
    "Respacing", RESPACING_PATTERN,
    docstring="A respacing: a count like '100', section counts like '10,15,25', or a DDIM stride like 'ddim50'.",
)
# sample_steps: a positive number of steps, a respacing string, or null for all T steps.
SampleSteps = Union[PositiveInt, Respacing, None]

AtLeastTwoInt = restricted_number_type("AtLeastTwoInt", int, (">=", 2))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require_int(setting: str, value, minimum: int, why: str = "") -> None:
    """``value`` is an int of at least ``minimum``; ``setting`` names it as a user writes it."""
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{setting}={value!r} must be an integer >= {minimum}{why}; "
                          f"set it to a whole number of at least {minimum}")


def require_unit_interval(setting: str, value) -> None:
    """``value`` is a number in [0, 1]."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{setting}={value!r} must be a number in [0, 1]; set it to a value from 0 to 1")


def require_choice(setting: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{setting}={value!r} is not one of {', '.join(map(repr, choices))}; set it to one of them")


def require_sample_steps(setting: str, value) -> None:
    """``value`` is None, a positive int or a respacing string (whether T can meet it is checked
    in ``setup``, where T is known)."""
    if value is None:
        return
    if _is_int(value):
        if value >= 1:
            return
    elif isinstance(value, str) and re.match(RESPACING_PATTERN, value):
        return
    raise ConfigError(
        f"{setting}={value!r} is not a respacing; set it to a positive number of steps like 100, section "
        f"counts like '10,15,25', a DDIM stride like 'ddim50', or null for all steps"
    )
