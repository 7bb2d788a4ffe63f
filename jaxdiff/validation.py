"""The library's checks of a single value, each worded once: every one raises
`errors.ArgumentError(name, value, problem)`, which `config_check` and `jobs/` turn into a line
naming the flag or config field that set it."""

import math
import numbers
from typing import Iterable

from jaxdiff.errors import ArgumentError

COMPUTE_DTYPES = ("float32", "bfloat16")  # what a network may compute in; params stay float32


def is_whole(value) -> bool:
  """An integer (Python's or NumPy's), not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def whole(name: str, value, low: int, never: bool = False) -> int:
  """A whole number ≥ `low` (`never`: 0 means never, and the message says so)."""
  if not is_whole(value) or value < low:
    raise ArgumentError(name, value, f"expected a whole number ≥ {low}"
                        + (" (0 means never)" if never else ""))
  return value


def interval_text(low: float, high: float, low_included: bool, high_included: bool) -> str:
  """'a finite number > 0', 'a number in [0, 1)'."""
  if math.isinf(high):
    return f"a finite number {'≥' if low_included else '>'} {low:g}"
  opening, closing = "[" if low_included else "(", "]" if high_included else ")"
  return f"a number in {opening}{low:g}, {high:g}{closing}"


def real(name: str, value, low: float, high: float = math.inf, low_included: bool = True,
         high_included: bool = False) -> float:
  """A finite real number in the interval (low, high), its ends included as told."""
  if not (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value)
          and (low <= value if low_included else low < value)
          and (value <= high if high_included else value < high)):
    raise ArgumentError(name, value,
                        f"expected {interval_text(low, high, low_included, high_included)}")
  return value


def boolean(name: str, value, optional: bool = False) -> bool | None:
  """True or False (`optional`: or None, for 'the default')."""
  if not (isinstance(value, bool) or optional and value is None):
    raise ArgumentError(name, value, "expected True or False" + (" (or unset)" if optional else ""))
  return value


def one_of(name: str, value, choices: Iterable[str], what: str = "") -> str:
  """One of `choices` (`what`: the kind of thing, for the message)."""
  choices = tuple(choices)
  if value not in choices:
    kind = f"unknown {what}; " if what else ""
    raise ArgumentError(name, value, f"{kind}choose one of {', '.join(map(str, choices))}")
  return value


def whole_tuple(name: str, value, low: int, non_empty: bool = True) -> tuple[int, ...]:
  """A tuple (or list) of whole numbers ≥ `low`; `non_empty`: with at least one."""
  if (not isinstance(value, (tuple, list)) or (non_empty and not value)
      or not all(is_whole(item) and item >= low for item in value)):
    example = "(1, 2)" if non_empty else "() or (16,)"
    raise ArgumentError(name, value, f"expected a tuple of whole numbers ≥ {low}, e.g. {example}")
  return tuple(value)
