"""Row-wise robust statistics on 2-D arrays with NaN for missing values.

numpy's nanmedian and nanquantile fall back to a Python loop per row on long rows; sorting
once and indexing by each row's count of valid values keeps the work vectorised.
"""

import numpy as np

# Scale that turns a median absolute deviation into a standard deviation for normal data.
MAD_TO_SIGMA = 1.4826

# Same for the 90th percentile of absolute deviations (1 / 1.6449).
Q90_TO_SIGMA = 0.6079


def row_quantiles(values: np.ndarray, quantiles, *, sorted_values: np.ndarray | None = None) -> np.ndarray:
    """Return per-row quantiles ignoring NaN, shape (rows, len(quantiles)); NaN for empty rows.

    Uses linear interpolation between order statistics, like numpy's default method. Rows
    without NaN go through a partial sort (np.partition), the others through a full sort.
    """
    values = np.asarray(values)
    result = np.full((values.shape[0], len(quantiles)), np.nan)
    if values.shape[1] == 0 or values.shape[0] == 0:
        return result
    if sorted_values is not None:
        return _sorted_quantiles(values, sorted_values, quantiles)
    has_nan = np.isnan(values).any(axis=1)
    if not has_nan.any():
        return _complete_quantiles(values, quantiles)
    complete = ~has_nan
    if complete.any():
        result[complete] = _complete_quantiles(values[complete], quantiles)
    if has_nan.any():
        gappy = values[has_nan]
        result[has_nan] = _sorted_quantiles(gappy, np.sort(gappy, axis=1), quantiles)
    return result


def _complete_quantiles(values: np.ndarray, quantiles) -> np.ndarray:
    width = values.shape[1]
    positions = [q * (width - 1) for q in quantiles]
    kth = sorted({int(np.floor(p)) for p in positions} | {min(int(np.floor(p)) + 1, width - 1) for p in positions})
    parted = np.partition(values, kth, axis=1)
    result = np.empty((values.shape[0], len(quantiles)))
    for column, position in enumerate(positions):
        low = int(np.floor(position))
        high = min(low + 1, width - 1)
        weight = position - low
        result[:, column] = parted[:, low] * (1 - weight) + parted[:, high] * weight
    return result


def _sorted_quantiles(values: np.ndarray, ordered: np.ndarray, quantiles) -> np.ndarray:
    count = np.sum(~np.isnan(values), axis=1)
    rows = np.arange(values.shape[0])
    result = np.full((values.shape[0], len(quantiles)), np.nan)
    has_data = count > 0
    for column, q in enumerate(quantiles):
        position = q * np.maximum(count - 1, 0)
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, np.maximum(count - 1, 0))
        weight = position - low
        estimate = ordered[rows, low] * (1 - weight) + ordered[rows, high] * weight
        result[:, column] = np.where(has_data, estimate, np.nan)
    return result


def row_median(values: np.ndarray) -> np.ndarray:
    """Return the per-row median ignoring NaN; NaN for rows without data."""
    return row_quantiles(values, [0.5])[:, 0]


def grouped_row_quantiles(values: np.ndarray, groups: np.ndarray, n_groups: int, quantiles) -> np.ndarray:
    """Return per-row quantiles of each column group, shape (rows, n_groups, len(quantiles)).

    Empty groups are NaN.
    """
    result = np.full((values.shape[0], n_groups, len(quantiles)), np.nan)
    order = np.argsort(groups, kind="stable")
    boundaries = np.searchsorted(groups[order], np.arange(n_groups + 1))
    grouped = values[:, order]
    for group in range(n_groups):
        if boundaries[group + 1] > boundaries[group]:
            result[:, group, :] = row_quantiles(grouped[:, boundaries[group] : boundaries[group + 1]], quantiles)
    return result


def grouped_row_median(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Return the per-row median of each column group, shape (rows, n_groups); NaN for empty groups."""
    return grouped_row_quantiles(values, groups, n_groups, [0.5])[:, :, 0]


def grouped_valid_count(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Return the number of non-NaN values per row and column group, shape (rows, n_groups)."""
    valid = (~np.isnan(values)).astype(np.float64)
    one_hot = np.zeros((values.shape[1], n_groups))
    one_hot[np.arange(values.shape[1]), groups] = 1.0
    return valid @ one_hot


def fill_nan_nearest(values: np.ndarray) -> np.ndarray:
    """Fill NaN along each row from the nearest earlier value, then the nearest later one."""
    filled = values.copy()
    columns = np.arange(values.shape[1])
    last_valid = np.where(~np.isnan(filled), columns, -1)
    np.maximum.accumulate(last_valid, axis=1, out=last_valid)
    rows = np.arange(values.shape[0])[:, None]
    forward = np.where(last_valid >= 0, filled[rows, np.maximum(last_valid, 0)], np.nan)
    next_valid = np.where(~np.isnan(filled), columns, values.shape[1])
    next_valid = np.minimum.accumulate(next_valid[:, ::-1], axis=1)[:, ::-1]
    backward = np.where(
        next_valid < values.shape[1], filled[rows, np.minimum(next_valid, values.shape[1] - 1)], np.nan
    )
    return np.where(np.isnan(forward), backward, forward)
