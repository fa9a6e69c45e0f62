"""Sliding-window statistics of every row of a panel, computed for all rows and columns at once.

The window that ends at column ``t`` covers columns ``t - window + 1`` to ``t``, so a feature at
``t`` uses no later data. Columns before the first complete window are NaN. Missing values (NaN)
are left out of a window's statistics; a window with fewer than ``min_count`` values is NaN.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from detectors._stats import row_median

STAT_FEATURES = ("mean", "std", "min", "max", "range", "skewness", "kurtosis")

# Feature kinds, for the floors of their control limits: location features move with the
# sensor's level, spread features with its noise, shape features have no unit.
LOCATION_FEATURES = ("mean", "min", "max")
SPREAD_FEATURES = ("std", "range")
SHAPE_FEATURES = ("skewness", "kurtosis")

# Below this variance share of the squared level, a window counts as constant: its skewness
# and kurtosis are set to 0 instead of a ratio of rounding errors.
CONSTANT_WINDOW_RATIO = 1e-12


def window_statistics(values: np.ndarray, window: int, min_count: int | None = None) -> np.ndarray:
    """Compute mean, std, min, max, range, skewness and excess kurtosis over sliding windows.

    Parameters
    ----------
    values : ndarray, shape (rows, columns)
        Panel with NaN for missing values.
    window : int
        Samples per window, at least 2.
    min_count : int, optional
        Valid samples a window needs; defaults to half the window, at least 2.

    Returns
    -------
    ndarray, shape (rows, 7, columns)
        The features in the order of STAT_FEATURES. Moments are population moments, and the
        kurtosis is the excess kurtosis (0 for normal data).

    Examples
    --------
    >>> x = np.array([[1.0, 2.0, 3.0, 4.0, 100.0]])
    >>> features = window_statistics(x, 4)
    >>> features[0, STAT_FEATURES.index("mean"), 3:].tolist()
    [2.5, 27.25]
    >>> bool(np.isnan(features[0, 0, 2]))
    True
    """
    values = np.asarray(values, dtype=np.float64)
    if window < 2:
        raise ValueError(f"invalid window {window}: expected at least 2 samples")
    if min_count is None:
        min_count = max(2, window // 2)
    n_rows, n_columns = values.shape
    features = np.full((n_rows, len(STAT_FEATURES), n_columns), np.nan)
    if n_columns < window or n_rows == 0:
        return features

    # Moments from cumulative sums of powers of the values minus each row's median, which keeps
    # the sums small enough for float64 on long rows.
    valid = ~np.isnan(values)
    centre = np.nan_to_num(row_median(values))
    shifted = np.where(valid, values - centre[:, None], 0.0)
    count = _window_sums(valid.astype(np.float64), window)
    sums = [_window_sums(shifted**power, window) for power in (1, 2, 3, 4)]

    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums[0] / count
        raw2, raw3, raw4 = sums[1] / count, sums[2] / count, sums[3] / count
        m2 = np.maximum(raw2 - mean**2, 0.0)
        m3 = raw3 - 3 * mean * raw2 + 2 * mean**3
        m4 = raw4 - 4 * mean * raw3 + 6 * mean**2 * raw2 - 3 * mean**4
        level = np.abs(mean + centre[:, None])
        constant = m2 <= CONSTANT_WINDOW_RATIO * np.maximum(level**2, 1e-300)
        skewness = np.where(constant, 0.0, m3 / m2**1.5)
        kurtosis = np.where(constant, 0.0, m4 / m2**2 - 3.0)

    # Extremes over a strided view: np.fmin and np.fmax skip NaN without copying the windows.
    view = sliding_window_view(values, window, axis=1)
    minimum = np.fmin.reduce(view, axis=-1)
    maximum = np.fmax.reduce(view, axis=-1)

    enough = count >= min_count
    last = slice(window - 1, None)
    columns = {
        "mean": mean + centre[:, None],
        "std": np.sqrt(m2),
        "min": minimum,
        "max": maximum,
        "range": maximum - minimum,
        "skewness": skewness,
        "kurtosis": kurtosis,
    }
    for index, name in enumerate(STAT_FEATURES):
        features[:, index, last] = np.where(enough, columns[name], np.nan)
    return features


def _window_sums(values: np.ndarray, window: int) -> np.ndarray:
    """Sum each complete window of ``window`` columns; shape (rows, columns - window + 1)."""
    cumulative = np.cumsum(values, axis=1)
    padded = np.concatenate([np.zeros((values.shape[0], 1)), cumulative], axis=1)
    return padded[:, window:] - padded[:, :-window]


def value_resolution(values: np.ndarray) -> np.ndarray:
    """Return each row's smallest step between distinct values, 0 for rows with fewer than two."""
    ordered = np.sort(values, axis=1)
    steps = np.diff(ordered, axis=1)
    scale = np.nanmax(np.abs(ordered), axis=1, initial=0.0, where=~np.isnan(ordered))
    meaningful = steps > 1e-9 * np.maximum(scale, 1e-300)[:, None]
    resolution = np.min(np.where(meaningful, steps, np.inf), axis=1, initial=np.inf)
    return np.where(np.isfinite(resolution), resolution, 0.0)


def chart_score(z: np.ndarray) -> np.ndarray:
    """Map unsigned deviations in standard deviations to the shared score scale.

    The map is piecewise linear: ``z / 2`` up to ``z = 2`` and ``1 + (z - 2)`` beyond, so 2
    standard deviations (the warning limit) score 1 and 3 (the critical limit) score 2.
    """
    z = np.asarray(z, dtype=np.float64)
    return np.where(z <= 2.0, z / 2.0, z - 1.0)
