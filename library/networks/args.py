"""`--network_args` handling shared by the network modules.

Values arrive as strings (`key=value` split at the first `=`), or as Python values when a
module is called from code. Each network module declares the keys it understands with a
converter; anything else is reported with the list of accepted keys instead of being
silently ignored. `dropout` is always accepted: the trainer adds it for LyCORIS (the
built-in modules take the neuron dropout from the `neuron_dropout` argument instead).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from library.errors import UserInputError

# Keys the trainer may add on its own; accepted by every module and ignored.
TRAINER_KEYS = frozenset({"dropout"})


class Converter:
    """A named conversion: `fn(value)` plus a phrase saying what it expects."""

    def __init__(self, fn: Callable[[Any], Any], expects: str):
        self.fn = fn
        self.expects = expects

    def __call__(self, value):
        return self.fn(value)


def _to_int(v) -> int:
    if isinstance(v, bool):
        raise ValueError(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError(v)
        return int(v)
    s = str(v).strip()
    try:
        return int(s)
    except ValueError:
        f = float(s)  # "8.0" is fine, "8.5" is not
        if not f.is_integer():
            raise
        return int(f)


def _to_float(v) -> float:
    if isinstance(v, bool):
        raise ValueError(v)
    f = float(v.strip() if isinstance(v, str) else v)
    if math.isnan(f):
        raise ValueError(v)
    return f


def _int_list(v) -> list[int]:
    if isinstance(v, (list, tuple)):
        return [_to_int(x) for x in v]
    return [_to_int(x) for x in str(v).split(",")]


def _float_list(v) -> list[float]:
    if isinstance(v, (list, tuple)):
        return [_to_float(x) for x in v]
    return [_to_float(x) for x in str(v).split(",")]


def _python_truthy(v) -> bool:
    # networks.oft converts with bool(str): any non-empty string (even "False") is true.
    return bool(v)


def _exact_true(v) -> bool:
    # lora_flux / lora_sd3 flags: only the exact string "True" (or the value True).
    return v is True or v == "True"


INT = Converter(_to_int, "an integer")
FLOAT = Converter(_to_float, "a number")
INT_LIST = Converter(_int_list, "comma-separated integers")
FLOAT_LIST = Converter(_float_list, "comma-separated numbers")
STR = Converter(lambda v: str(v).strip(), "a string")
TRUTHY = Converter(_python_truthy, "any non-empty string for true")
EXACT_TRUE = Converter(_exact_true, "'True' for true")


def parse_network_kwargs(kwargs: Mapping[str, Any], accepted: Mapping[str, Converter], module: str) -> dict:
    """Validate and convert network kwargs.

    Returns {key: converted value} for the accepted keys that were given with a value other
    than None. Raises UserInputError for unknown keys (listing the accepted ones) and for
    values the converter rejects (naming the key and the expected form).
    """
    unknown = sorted(k for k in kwargs if k not in accepted and k not in TRAINER_KEYS)
    if unknown:
        raise UserInputError(
            f"{module}: unknown --network_args key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(k) for k in unknown)}; accepted keys: {', '.join(sorted(accepted))}"
        )
    out = {}
    for key, conv in accepted.items():
        if key not in kwargs:
            continue
        value = kwargs[key]
        if value is None:
            continue
        try:
            out[key] = conv(value)
        except (TypeError, ValueError):
            raise UserInputError(f"{module}: --network_args {key}={value!r}: expected {conv.expects}") from None
    return out
