"""Early checks of option values, with messages that name the option (and the fix)."""

from __future__ import annotations


def require_at_least(minimum: float, prefix: str = "", hint: str = "", **values: float) -> None:
    """Raise ``ValueError`` naming ``prefix + name`` for any value below ``minimum``;
    ``hint`` (the fix) is appended to the message."""
    for name, value in values.items():
        if value < minimum:
            raise ValueError(f"{prefix}{name} must be >= {minimum}, got {value}" + _tail(hint))


def require_in_range(low: float, high: float, prefix: str = "", hint: str = "",
                     **values: float) -> None:
    """Raise ``ValueError`` naming ``prefix + name`` for any value outside [low, high]."""
    for name, value in values.items():
        if not low <= value <= high:
            raise ValueError(f"{prefix}{name} must be in [{low}, {high}], got {value}"
                             + _tail(hint))


def _tail(hint: str) -> str:
    return f"; {hint}" if hint else ""
