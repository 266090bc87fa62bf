"""Durations on the command line, written like the registry's config: `90s`, `30m`, `1h`, `7d`.

Parts can be combined (`1h30m`); `0` or `0s` means none. Anything else is refused with
a message saying what is accepted, rather than guessed at.
"""

from __future__ import annotations

import re
from datetime import timedelta

from regfsck.errors import UsageError

UNIT_SECONDS: dict[str, int] = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_PART = re.compile(r"(\d{1,9})([dhms])")
_WHOLE = re.compile(r"(?:\d{1,9}[dhms])+")


class DurationError(UsageError, ValueError):
    """Not a duration regfsck accepts (a usage error, exit 2)."""


def parse_duration(text: str, option: str | None = None) -> timedelta:
    """`90s`, `30m`, `1h`, `7d`, combinations such as `1h30m`; `0` or `0s` means none.

    `option` (e.g. `--grace`) starts the error message: the operator sees which value."""
    value = text.strip()
    if value == "0":
        return timedelta(0)
    if not _WHOLE.fullmatch(value):
        raise DurationError(
            (f"{option}: " if option else "")
            + f"not a duration: {text[:40]!r} (write e.g. 90s, 30m, 1h, 7d or 1h30m; 0 for none)")
    return timedelta(seconds=sum(int(n) * UNIT_SECONDS[u] for n, u in _PART.findall(value)))


def format_duration(duration: timedelta) -> str:
    """The shortest form `parse_duration` reads back to the same whole seconds."""
    seconds = int(duration.total_seconds())
    if seconds <= 0:
        return "0s"
    parts: list[str] = []
    for unit, size in UNIT_SECONDS.items():
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
