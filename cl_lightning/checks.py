"""Early checks of option values, with messages that name the option (and the fix).

A :class:`UsageError` is a problem the user fixes by changing an option, a config or a file
(not a bug): the command line (:func:`cl_lightning.cli.main`) prints its message as one
line, ``error: ...``, and exits with status 2, like argparse. Setting the environment
variable ``CL_LIGHTNING_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input the user can fix; its message names the option (or file) and the fix."""


class OptionError(UsageError, ValueError):
    """An option value out of its range, or options that contradict each other."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file or folder the options point to does not exist."""


def require_at_least(minimum: float, prefix: str = "", hint: str = "", **values: float) -> None:
    """Raise :class:`OptionError` naming ``prefix + name`` for any value below ``minimum``;
    ``hint`` (the fix) is appended to the message."""
    for name, value in values.items():
        if value < minimum:
            raise OptionError(f"{prefix}{name} must be >= {minimum}, got {value}" + _tail(hint))


def require_in_range(low: float, high: float, prefix: str = "", hint: str = "",
                     **values: float) -> None:
    """Raise :class:`OptionError` naming ``prefix + name`` for any value outside [low, high]."""
    for name, value in values.items():
        if not low <= value <= high:
            raise OptionError(f"{prefix}{name} must be in [{low}, {high}], got {value}"
                              + _tail(hint))


def find_usage_error(err: BaseException) -> UsageError | None:
    """The :class:`UsageError` that ``err`` is or was raised from (following ``__cause__``
    and ``__context__``, as wrappers such as jsonargparse's re-raise it), else ``None``."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UsageError):
            return e
        todo += [e.__cause__, e.__context__]
    return None


def one_line(message: object) -> str:
    """``message`` as one line: its lines joined with ' ', runs of spaces collapsed."""
    return " ".join(str(message).split())


def _tail(hint: str) -> str:
    return f"; {hint}" if hint else ""
