"""The interface every detector type implements, and the input checks they share.

A detector works on a panel: a 2-D float array with one row per series and one column per
time step, plus the column timestamps. ``fit`` learns per-row state; ``score`` walks new
columns in time order, so the score of a column only uses data up to that column.
"""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pydantic import BaseModel

# Bumped when the saved state layout of any detector changes; older files are refitted.
STATE_FORMAT_VERSION = 2


@dataclass(frozen=True)
class Scores:
    """Per-point results of one ``score`` call; every array is (series, time), NaN where not scored."""

    score: np.ndarray
    expected: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


class StateError(ValueError):
    """Saved detector state that does not match the current detector or format."""


def check_panel(values, timestamps, *, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Validate a panel and return it as (float64 values, float64 timestamps).

    Raises ValueError naming the problem. Non-finite values become NaN (missing).
    """
    values = np.asarray(values, dtype=np.float64)
    timestamps = np.asarray(timestamps, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must be a 2-D array (series x time), got shape {values.shape}")
    if timestamps.ndim != 1 or timestamps.shape[0] != values.shape[1]:
        raise ValueError(
            f"timestamps must be 1-D with one entry per column: got {timestamps.shape[0] if timestamps.ndim == 1 else timestamps.shape} "
            f"for {values.shape[1]} columns"
        )
    if timestamps.size > 1:
        gaps = np.diff(timestamps)
        if np.any(gaps <= 0):
            raise ValueError("timestamps must be strictly increasing")
        if not np.allclose(gaps / step, np.round(gaps / step), atol=1e-6):
            raise ValueError(f"timestamps must lie on a grid of the step ({step:g}s)")
    if not np.all(np.isfinite(values)):
        values = np.where(np.isfinite(values), values, np.nan)
    return values, timestamps


class Detector:
    """Base class: hyper-parameters in ``params``; learned attributes end with ``_``.

    Parameters
    ----------
    params : the type's ``Params`` model instance.
    step : seconds between panel columns.
    timezone : IANA zone whose clock daily and weekly cycles follow.
    direction : "both", "up" or "down": which side of the band counts as anomalous.
    """

    Params: ClassVar[type[BaseModel]]
    type_name: ClassVar[str]

    def __init__(self, params: BaseModel, *, step: float, timezone: str = "UTC", direction: str = "both"):
        self.params = params
        self.step = float(step)
        self.timezone = timezone
        self.direction = direction

    def fit(self, values: np.ndarray, timestamps: np.ndarray) -> "Detector":
        raise NotImplementedError

    def score(self, values: np.ndarray, timestamps: np.ndarray, rows: np.ndarray | None = None) -> Scores:
        """Score each column in time order; ``rows[i]`` is the fitted row of panel row ``i``."""
        raise NotImplementedError

    @property
    def ready_(self) -> np.ndarray:
        """Boolean per fitted row: True when the row had enough history to be scored."""
        raise NotImplementedError

    def get_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Return the fitted state as numeric arrays and a JSON-serialisable dict."""
        raise NotImplementedError

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict) -> "Detector":
        """Restore fitted state saved by ``get_state``; raises StateError when it does not fit."""
        raise NotImplementedError

    def directional(self, z: np.ndarray) -> np.ndarray:
        """Turn signed deviations into unsigned ones, keeping only the configured side."""
        if self.direction == "up":
            return np.maximum(z, 0.0)
        if self.direction == "down":
            return np.maximum(-z, 0.0)
        return np.abs(z)
