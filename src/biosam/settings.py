"""The one way Settings classes check their values.

Every ``*Settings`` dataclass calls :func:`check` from its ``__post_init__``
with a list of rules, so a bad value is refused where the settings are made
(before any model loads), and every refusal reads the same way::

    check("AMG settings", [
        whole("points_per_side", self.points_per_side, 1),
        within("pred_iou_thresh", self.pred_iou_thresh, 0.0, 1.0),
        choice("prompt", self.prompt, PROMPT_KINDS),
        rule(self.box_size > 0, "box_size must be > 0"),
    ])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from numbers import Real

from biosam.errors import InputError

Rule = tuple[bool, str]


def rule(ok: bool, message: str) -> Rule:
    """A rule with its own message (``message`` says what is required)."""
    return bool(ok), message


def _number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def whole(name: str, value: object, minimum: int = 0) -> Rule:
    """``value`` is a whole number >= ``minimum`` (``3.0`` counts, ``True`` does not)."""
    ok = _number(value) and int(value) == value and value >= minimum
    return ok, f"{name} must be a whole number >= {minimum}, got {value!r}"


def within(name: str, value: object, low: float, high: float, *, open_low: bool = False) -> Rule:
    """``low <= value <= high`` (``low < value`` with ``open_low``); infinite ends allowed."""
    ok = _number(value) and (low < value if open_low else low <= value) and value <= high
    bracket = "(" if open_low else "["
    return ok, f"{name} must lie in {bracket}{low}, {high}], got {value!r}"


def positive(name: str, value: object) -> Rule:
    """``value`` is a number > 0."""
    return _number(value) and value > 0, f"{name} must be > 0, got {value!r}"


def choice(name: str, value: object, choices: Sequence[object]) -> Rule:
    """``value`` is one of ``choices``."""
    return value in choices, f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}"


def check(owner: str, rules: Iterable[Rule]) -> None:
    """Raise :class:`InputError` naming every broken rule of ``owner`` (e.g. "AMG settings")."""
    broken = [message for ok, message in rules if not ok]
    if broken:
        raise InputError(f"{owner}: {'; '.join(broken)}.")
