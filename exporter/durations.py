"""Prometheus duration strings such as ``1h30m`` or ``14d``."""

import re

_UNIT_SECONDS = {
    "ms": 0.001,
    "s": 1,
    "m": 60,
    "h": 3600,
    "d": 86400,
    "w": 7 * 86400,
    "y": 365 * 86400,
}

# Units must appear from largest to smallest, each at most once, as Prometheus requires.
_DURATION = re.compile(
    r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$"
)
_ORDERED_UNITS = ("y", "w", "d", "h", "m", "s", "ms")


def parse_duration(text: str) -> float:
    """Parse a Prometheus duration into seconds.

    Raises ValueError naming the bad value and the expected form.
    """
    match = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if match is None or not any(match.groups()):
        raise ValueError(
            f"invalid duration {text!r}: expected a Prometheus duration such as 30s, 5m, 1h30m or 14d"
        )
    seconds = 0.0
    for unit, amount in zip(_ORDERED_UNITS, match.groups()):
        if amount is not None:
            seconds += int(amount) * _UNIT_SECONDS[unit]
    return seconds


def format_duration(seconds: float) -> str:
    """Format seconds as the shortest Prometheus duration string."""
    milliseconds = int(round(seconds * 1000))
    if milliseconds == 0:
        return "0s"
    parts = []
    for unit in _ORDERED_UNITS:
        unit_ms = int(_UNIT_SECONDS[unit] * 1000)
        amount, milliseconds = divmod(milliseconds, unit_ms)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts)
