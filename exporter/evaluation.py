"""Evaluation metrics for anomaly detectors, for backtests and benchmarks.

The point-wise, event-wise and threshold functions take per-row labels (true or 1 marks an
anomalous row) and either per-row anomaly scores or boolean flags. A row is flagged when its score
is at least the threshold, and a NaN score is never flagged.

The NAB functions implement the scoring of the Numenta Anomaly Benchmark (NAB) v1. It has a
probation period, labelled windows that reward early detection through a scaled sigmoid, false
positives that cost less right after a window, and three cost profiles. The score is normalised so
that a detector that flags nothing scores 0 and a perfect one scores 100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

# --- Point-wise and event-wise metrics -----------------------------------------------------------


@dataclass(frozen=True)
class DetectionMetrics:
    """Precision, recall and F1 of flagged rows against labelled rows, with their counts.

    A ratio whose denominator is zero (no flagged row, no labelled row) is 0.0.
    """

    precision: float
    recall: float
    f1: float
    true_positives: int
    false_positives: int
    false_negatives: int


@dataclass(frozen=True)
class EventMetrics:
    """Event-wise precision, recall and F1.

    An event is a contiguous run of labelled rows, and a predicted segment is a contiguous run of
    flagged rows. Recall is the share of events with at least one flagged row. Precision is the
    share of predicted segments that overlap at least one event. A ratio whose denominator is
    zero is 0.0.
    """

    precision: float
    recall: float
    f1: float
    events: int
    detected_events: int
    predicted_segments: int
    matched_segments: int
    """Predicted segments that overlap at least one event."""


@dataclass(frozen=True)
class BestF1:
    """The threshold with the highest point-wise F1 and the metrics at that threshold."""

    threshold: float
    metrics: DetectionMetrics


def flags_at(scores, threshold: float) -> np.ndarray:
    """Return a boolean mask of the rows whose score is at least ``threshold``. NaN is never flagged."""
    values = _as_float_array(scores, "scores")
    with np.errstate(invalid="ignore"):
        return values >= threshold


def find_segments(mask) -> np.ndarray:
    """Find the contiguous runs of true rows in ``mask``.

    Returns an integer array of shape (k, 2) with the first and last row of each run, both
    inclusive, in row order.
    """
    values = _as_bool_array(mask, "mask")
    padded = np.concatenate(([False], values, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return edges.reshape(-1, 2) - np.array([0, 1])


def point_metrics(labels, flags) -> DetectionMetrics:
    """Compute point-wise precision, recall and F1: every row counts once."""
    truth, predicted = _as_label_and_flag_arrays(labels, flags)
    true_positives = int(np.count_nonzero(truth & predicted))
    false_positives = int(np.count_nonzero(~truth & predicted))
    false_negatives = int(np.count_nonzero(truth & ~predicted))
    return _metrics_from_counts(true_positives, false_positives, false_negatives)


def point_metrics_at(labels, scores, threshold: float) -> DetectionMetrics:
    """Compute point-wise precision, recall and F1 of the rows whose score is at least ``threshold``."""
    return point_metrics(labels, flags_at(scores, threshold))


def event_metrics(labels, flags) -> EventMetrics:
    """Compute event-wise precision, recall and F1 (see EventMetrics for the definitions)."""
    truth, predicted = _as_label_and_flag_arrays(labels, flags)
    events = find_segments(truth)
    segments = find_segments(predicted)

    detected = _segments_overlapping(events, predicted)
    matched = _segments_overlapping(segments, truth)
    detected_events = int(np.count_nonzero(detected))
    matched_segments = int(np.count_nonzero(matched))

    precision = _ratio(matched_segments, len(segments))
    recall = _ratio(detected_events, len(events))
    return EventMetrics(
        precision=precision,
        recall=recall,
        f1=_harmonic_mean(precision, recall),
        events=len(events),
        detected_events=detected_events,
        predicted_segments=len(segments),
        matched_segments=matched_segments,
    )


def point_adjust(labels, flags) -> np.ndarray:
    """Flag every row of each event that has at least one flagged row, as in point adjustment.

    Flags outside events are returned unchanged.
    """
    truth, predicted = _as_label_and_flag_arrays(labels, flags)
    adjusted = predicted.copy()
    events = find_segments(truth)
    for start, end in events[_segments_overlapping(events, predicted)]:
        adjusted[start : end + 1] = True
    return adjusted


def point_adjusted_metrics(labels, flags) -> DetectionMetrics:
    """Compute point-wise metrics after point adjustment. NOT a fair metric.

    This is the protocol of many published papers: when any row of an event is flagged, the whole
    event counts as detected. One flag in a long event then earns the recall of every row in it,
    so random scores can reach a high F1 on long events. Report it only next to the point-wise
    and event-wise metrics, and only to compare with those papers.
    """
    return point_metrics(labels, point_adjust(labels, flags))


def pr_auc(labels, scores) -> float:
    """Compute the area under the precision-recall curve as average precision (scikit-learn).

    NaN scores rank below every finite score. Raises ValueError when no row is labelled
    anomalous, because the curve is then undefined.
    """
    truth = _as_bool_array(labels, "labels")
    values = _as_float_array(scores, "scores")
    _check_same_length(truth, values)
    if not truth.any():
        raise ValueError("invalid labels: no row is labelled anomalous, so PR-AUC is undefined")
    return float(average_precision_score(truth, _rank_nan_lowest(values)))


def best_f1_threshold(labels, scores) -> BestF1:
    """Find the threshold with the highest point-wise F1 among all distinct scores.

    Every distinct non-NaN score is tried as a threshold. Of thresholds with equal F1, the highest
    wins. Raises ValueError when no row is labelled anomalous or every score is NaN.
    """
    truth = _as_bool_array(labels, "labels")
    values = _as_float_array(scores, "scores")
    _check_same_length(truth, values)
    if not truth.any():
        raise ValueError("invalid labels: no row is labelled anomalous, so F1 is 0 at every threshold")
    scored = ~np.isnan(values)
    if not scored.any():
        raise ValueError("invalid scores: every score is NaN, so no threshold flags any row")

    order = np.argsort(-values[scored], kind="stable")
    sorted_scores = values[scored][order]
    sorted_truth = truth[scored][order]
    # Flagging down to the last row of each run of equal scores gives the counts at that score.
    last_of_run = _last_of_runs(sorted_scores)
    true_positives = np.cumsum(sorted_truth)[last_of_run]
    false_positives = (last_of_run + 1) - true_positives
    positives = int(np.count_nonzero(truth))
    f1 = 2 * true_positives / (2 * true_positives + false_positives + (positives - true_positives))

    best = int(np.argmax(f1))
    threshold = float(sorted_scores[last_of_run[best]])
    return BestF1(threshold=threshold, metrics=point_metrics_at(truth, values, threshold))


def detection_delays(labels, flags, timestamps=None) -> np.ndarray:
    """Measure, for each detected event, the time from its first row to its first flagged row.

    Returns one float per detected event, in event order, so undetected events are left out.
    Without ``timestamps`` the delay is a number of rows. With numeric timestamps it is in their
    unit, and with datetime timestamps it is in seconds.
    """
    truth, predicted = _as_label_and_flag_arrays(labels, flags)
    if timestamps is None:
        times = np.arange(len(truth), dtype=float)
    else:
        times = _as_times(timestamps)
        _check_same_length(truth, times)

    delays = []
    for start, end in find_segments(truth):
        flagged = np.flatnonzero(predicted[start : end + 1])
        if len(flagged):
            delays.append(times[start + flagged[0]] - times[start])
    return np.array(delays, dtype=float)


def false_alarm_rate(labels, flags) -> float:
    """Compute the share of normal (unlabelled) rows that are flagged, FP / (FP + TN).

    Raises ValueError when every row is labelled anomalous.
    """
    truth, predicted = _as_label_and_flag_arrays(labels, flags)
    normal = ~truth
    if not normal.any():
        raise ValueError("invalid labels: every row is labelled anomalous, so no false alarm is possible")
    return float(np.count_nonzero(predicted & normal) / np.count_nonzero(normal))


def _metrics_from_counts(true_positives: int, false_positives: int, false_negatives: int) -> DetectionMetrics:
    precision = _ratio(true_positives, true_positives + false_positives)
    recall = _ratio(true_positives, true_positives + false_negatives)
    return DetectionMetrics(
        precision=precision,
        recall=recall,
        f1=_harmonic_mean(precision, recall),
        true_positives=true_positives,
        false_positives=false_positives,
        false_negatives=false_negatives,
    )


def _last_of_runs(sorted_values: np.ndarray) -> np.ndarray:
    """Return the index of the last element of each run of equal values in a sorted array."""
    if len(sorted_values) == 0:
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero(np.append(sorted_values[1:] != sorted_values[:-1], True))


def _segments_overlapping(segments: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Return, for each inclusive (start, end) segment, whether any row of ``mask`` in it is true."""
    counts = np.concatenate(([0], np.cumsum(mask)))
    return counts[segments[:, 1] + 1] - counts[segments[:, 0]] > 0


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def _harmonic_mean(precision: float, recall: float) -> float:
    total = precision + recall
    return 2 * precision * recall / total if total else 0.0


def _as_bool_array(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"invalid {name}: expected a 1-D array, got shape {array.shape}")
    if array.dtype == bool:
        return array
    numeric = array.astype(float)
    if np.isnan(numeric).any():
        raise ValueError(f"invalid {name}: contains NaN, expected 0/1 or booleans")
    return numeric != 0


def _as_float_array(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"invalid {name}: expected a 1-D array, got shape {array.shape}")
    return array


def _as_label_and_flag_arrays(labels, flags) -> tuple[np.ndarray, np.ndarray]:
    truth = _as_bool_array(labels, "labels")
    predicted = _as_bool_array(flags, "flags")
    _check_same_length(truth, predicted)
    return truth, predicted


def _check_same_length(labels: np.ndarray, other: np.ndarray) -> None:
    if len(labels) != len(other):
        raise ValueError(f"length mismatch: {len(labels)} labels but {len(other)} values, expected one per row")


def _rank_nan_lowest(values: np.ndarray) -> np.ndarray:
    nan = np.isnan(values)
    if not nan.any():
        return values
    finite = values[~nan]
    lowest = float(finite.min()) - 1.0 if len(finite) else 0.0
    return np.where(nan, lowest, values)


def _as_times(timestamps) -> np.ndarray:
    array = np.asarray(timestamps)
    if array.ndim != 1:
        raise ValueError(f"invalid timestamps: expected a 1-D array, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.datetime64) or array.dtype == object:
        index = pd.DatetimeIndex(pd.to_datetime(array))
        return (index - index[0]).total_seconds().to_numpy(dtype=float) if len(index) else np.empty(0)
    return array.astype(float)


# --- NAB scoring ---------------------------------------------------------------------------------

NAB_PROBATION_FRACTION = 0.15
"""Share of each file's rows that NAB never scores, at most NAB_MAX_PROBATION_ROWS."""
NAB_MAX_PROBATION_ROWS = 750
"""Upper limit of the probation period, in rows."""


@dataclass(frozen=True)
class NabProfile:
    """Weights of one NAB cost profile: A_TP, A_FP and A_FN."""

    tp_weight: float
    fp_weight: float
    fn_weight: float


NAB_PROFILES: dict[str, NabProfile] = {
    "standard": NabProfile(tp_weight=1.0, fp_weight=0.11, fn_weight=1.0),
    "reward_low_FP_rate": NabProfile(tp_weight=1.0, fp_weight=0.22, fn_weight=1.0),
    "reward_low_FN_rate": NabProfile(tp_weight=1.0, fp_weight=0.11, fn_weight=2.0),
}
"""The three profiles of NAB v1's ``config/profiles.json``."""


@dataclass(frozen=True, eq=False)
class NabRowWeights:
    """Per-row contributions to a NAB file score that do not depend on the threshold or profile.

    A flagged row inside window k adds ``tp_weight[i] * A_TP`` when it is the earliest flagged row
    of that window. A flagged row outside every window adds ``fp_factor[i] * A_FP``.
    """

    probation: int
    """Number of leading rows that are never scored."""
    window_of_row: np.ndarray
    """Index of the window that contains each row, or -1 outside every window."""
    tp_weight: np.ndarray
    """s(-(R - i + 1) / w) / s(-1) for rows inside a window, in (0, 1], and 0 elsewhere."""
    fp_factor: np.ndarray
    """Factor in [-1, 0) for rows outside every window, and 0 inside windows."""
    windows: np.ndarray
    """Windows as an (k, 2) integer array of first and last row, both inclusive, sorted."""


@dataclass(frozen=True, eq=False)
class NabFileScores:
    """A detector's per-row anomaly scores for one NAB file and the file's labelled windows.

    ``scores`` must have one value per row of the data file, duplicates included, in file order,
    because NAB's windows and probation count rows, not timestamps.
    """

    name: str
    scores: np.ndarray
    windows: tuple[tuple[int, int], ...]
    """First and last row of each labelled window, both inclusive."""
    probation: int | None = None
    """Rows never scored. None applies NAB's rule, see nab_probation_rows."""

    @cached_property
    def weights(self) -> NabRowWeights:
        return nab_row_weights(len(self.scores), self.windows, self.probation)


@dataclass(frozen=True)
class NabFileResult:
    """NAB raw score of one file and the row counts of NAB's per-file results.

    The counts cover the scored rows only, so probation rows are in none of them.
    """

    name: str
    raw_score: float
    true_positives: int
    """Flagged rows inside windows."""
    false_positives: int
    """Flagged rows outside every window."""
    false_negatives: int
    """Rows inside windows that are not flagged."""
    true_negatives: int
    """Rows outside every window that are not flagged."""
    windows: int
    detected_windows: int


@dataclass(frozen=True)
class NabScore:
    """NAB score of a detector over a corpus at one threshold and profile."""

    threshold: float
    raw_score: float
    null_score: float
    """Raw score of a detector that flags nothing: -A_FN per window."""
    perfect_score: float
    """Raw score of a detector that flags exactly the first row of every window: A_TP per window."""
    files: tuple[NabFileResult, ...] = field(repr=False)

    @property
    def normalized_score(self) -> float:
        """Score on NAB's published scale, where flagging nothing is 0 and perfect is 100."""
        return nab_normalize(self.raw_score, self.null_score, self.perfect_score)


@dataclass(frozen=True, eq=False)
class NabSweep:
    """Corpus raw score at every threshold that changes which rows are flagged.

    ``thresholds`` is descending. Its first entry is +inf, which flags nothing, and the others are
    the distinct scores of the scored rows.
    """

    thresholds: np.ndarray
    raw_scores: np.ndarray
    null_score: float
    perfect_score: float

    @property
    def normalized_scores(self) -> np.ndarray:
        return nab_normalize(self.raw_scores, self.null_score, self.perfect_score)

    @property
    def best_index(self) -> int:
        """Index of the highest raw score. Of equal raw scores, the highest threshold wins."""
        return int(np.argmax(self.raw_scores))


def nab_scaled_sigmoid(y):
    """Compute NAB's scaled sigmoid s(y) = 2 / (1 + e^(5y)) - 1 for y <= 3, and -1 above 3.

    s is 0 at y = 0, tends to 1 for negative y and to -1 for positive y.
    """
    values = np.asarray(y, dtype=float)
    # Clipping first keeps exp from overflowing on the large y that the where() replaces.
    sigmoid = 2.0 / (1.0 + np.exp(5.0 * np.minimum(values, 3.0))) - 1.0
    result = np.where(values > 3.0, -1.0, sigmoid)
    return float(result) if result.ndim == 0 else result


def nab_probation_rows(n_rows: int) -> int:
    """Return how many leading rows of an ``n_rows`` file NAB never scores: min(floor(0.15 n), 750)."""
    if n_rows < 0:
        raise ValueError(f"invalid row count {n_rows}: expected a non-negative integer")
    return min(math.floor(NAB_PROBATION_FRACTION * n_rows), NAB_MAX_PROBATION_ROWS)


def nab_window_rows(timestamps, windows) -> tuple[tuple[int, int], ...]:
    """Convert windows given as (start, end) timestamps into (first row, last row) pairs.

    A row belongs to a window when its timestamp lies in [start, end], as in NAB's per-row labels.
    The pair spans the first and last such row in file order. Raises ValueError when a window
    contains no row.
    """
    times = pd.DatetimeIndex(pd.to_datetime(np.asarray(timestamps))).to_numpy()
    rows = []
    for start, end in windows:
        start_time = np.datetime64(pd.Timestamp(start))
        end_time = np.datetime64(pd.Timestamp(end))
        inside = np.flatnonzero((times >= start_time) & (times <= end_time))
        if len(inside) == 0:
            raise ValueError(f"invalid window [{start}, {end}]: no row has a timestamp inside it")
        # NOTE: when timestamps step backwards inside a window, rows between the first and last
        # match count as part of it even if their own timestamp is outside. No NAB v1 window
        # contains such a step.
        rows.append((int(inside[0]), int(inside[-1])))
    return tuple(rows)


def nab_row_weights(n_rows: int, windows: Sequence[tuple[int, int]], probation: int | None = None) -> NabRowWeights:
    """Precompute each row's contribution to the NAB score of a file with ``n_rows`` rows.

    ``windows`` lists the first and last row of each window, both inclusive. Windows must not
    overlap. ``probation`` defaults to nab_probation_rows(n_rows). Raises ValueError on a window
    outside the file or on overlapping windows.
    """
    bounds = _check_nab_windows(windows, n_rows)
    if probation is None:
        probation = nab_probation_rows(n_rows)
    if not 0 <= probation <= n_rows:
        raise ValueError(f"invalid probation {probation}: expected 0 to {n_rows} rows")

    rows = np.arange(n_rows)
    window_of_row = np.full(n_rows, -1, dtype=np.int64)
    tp_weight = np.zeros(n_rows)
    full_credit = nab_scaled_sigmoid(-1.0)
    for index, (first, last) in enumerate(bounds):
        width = last - first + 1
        inside = rows[first : last + 1]
        window_of_row[first : last + 1] = index
        # The first row of a window is at relative position -1 and earns A_TP. Later rows earn
        # less, down to s(-1/w) / s(-1) at the last row.
        tp_weight[first : last + 1] = nab_scaled_sigmoid(-(last - inside + 1) / width) / full_credit

    fp_factor = np.zeros(n_rows)
    outside = window_of_row < 0
    # Index of the last window that ends before each row, or -1 when none does.
    previous = np.searchsorted(bounds[:, 1], rows, side="left") - 1
    after_window = outside & (previous >= 0)
    fp_factor[outside & ~after_window] = -1.0
    if after_window.any():
        previous_last = bounds[previous[after_window], 1]
        previous_width = bounds[previous[after_window], 1] - bounds[previous[after_window], 0] + 1
        distance = rows[after_window] - previous_last
        # NOTE: NAB divides by w' - 1, which is zero for a one-row window. Such a window is taken
        # as infinitely short, so every false positive after it costs the full A_FP. NAB v1 has
        # no one-row window.
        position = np.where(previous_width > 1, distance / np.maximum(previous_width - 1, 1), np.inf)
        fp_factor[after_window] = nab_scaled_sigmoid(position)

    return NabRowWeights(
        probation=int(probation),
        window_of_row=window_of_row,
        tp_weight=tp_weight,
        fp_factor=fp_factor,
        windows=bounds,
    )


def nab_score_file(file: NabFileScores, profile: NabProfile, threshold: float) -> NabFileResult:
    """Compute the NAB raw score of one file at ``threshold``.

    Each window earns A_TP times the weight of its earliest flagged row, or costs A_FN when no row
    in it is flagged. Each flagged row outside every window costs A_FP times its factor. Rows in
    the probation period are ignored.
    """
    weights = file.weights
    scored = np.arange(len(file.scores)) >= weights.probation
    flagged = flags_at(file.scores, threshold) & scored
    in_window = weights.window_of_row >= 0

    false_positive_rows = flagged & ~in_window
    raw_score = profile.fp_weight * float(weights.fp_factor[false_positive_rows].sum())

    detection_rows = np.flatnonzero(flagged & in_window)
    # Rows are ascending, so the first occurrence of each window index is its earliest detection.
    detected_windows, first = np.unique(weights.window_of_row[detection_rows], return_index=True)
    raw_score += profile.tp_weight * float(weights.tp_weight[detection_rows[first]].sum())
    missed_windows = len(weights.windows) - len(detected_windows)
    raw_score -= profile.fn_weight * missed_windows

    return NabFileResult(
        name=file.name,
        raw_score=raw_score,
        true_positives=len(detection_rows),
        false_positives=int(np.count_nonzero(false_positive_rows)),
        false_negatives=int(np.count_nonzero(in_window & scored & ~flagged)),
        true_negatives=int(np.count_nonzero(~in_window & scored & ~flagged)),
        windows=len(weights.windows),
        detected_windows=len(detected_windows),
    )


def nab_score(files: Sequence[NabFileScores], profile: NabProfile, threshold: float) -> NabScore:
    """Compute the NAB score of a corpus at one threshold."""
    results = tuple(nab_score_file(file, profile, threshold) for file in files)
    null_score, perfect_score = _nab_bounds(files, profile)
    return NabScore(
        threshold=float(threshold),
        raw_score=float(sum(result.raw_score for result in results)),
        null_score=null_score,
        perfect_score=perfect_score,
        files=results,
    )


def nab_sweep(files: Sequence[NabFileScores], profile: NabProfile) -> NabSweep:
    """Compute the corpus raw score at every distinct score value and at "flag nothing".

    Lowering the threshold past a score flags the rows with that score. Each such row changes the
    raw score by a fixed amount: its A_FP cost outside windows, or inside a window the rise of
    the window's best weight. The rows of the whole corpus are sorted by score once, so the sweep
    costs O(N log N) for N scored rows.
    """
    null_score, perfect_score = _nab_bounds(files, profile)
    scores, values, window_ids = _nab_scored_rows(files, profile)

    order = np.argsort(-scores, kind="stable")
    change = np.empty(len(scores))
    outside = window_ids < 0
    change[outside] = values[outside]

    # Inside a window only the earliest flagged row counts, and it has the highest weight of the
    # flagged rows because weights fall along the window. So a window's value at any threshold is
    # A_TP times the highest weight flagged so far, and -A_FN before any flag.
    window_rows = order[~outside[order]]
    by_window = pd.Series(values[window_rows]).groupby(window_ids[window_rows])
    best_so_far = by_window.cummax()
    best_before = best_so_far.groupby(window_ids[window_rows]).shift(1).fillna(-profile.fn_weight)
    change[window_rows] = (best_so_far - best_before).to_numpy()

    sorted_scores = scores[order]
    running = null_score + np.cumsum(change[order])
    last_of_run = _last_of_runs(sorted_scores)
    return NabSweep(
        thresholds=np.concatenate(([np.inf], sorted_scores[last_of_run])),
        raw_scores=np.concatenate(([null_score], running[last_of_run])),
        null_score=null_score,
        perfect_score=perfect_score,
    )


def nab_optimize_threshold(files: Sequence[NabFileScores], profile: NabProfile) -> NabScore:
    """Find the threshold with the highest corpus raw score by an exhaustive sweep, and score it.

    The candidates are every distinct score of a scored row and +inf, which flags nothing. Of
    thresholds with equal raw score, the highest wins.
    """
    sweep = nab_sweep(files, profile)
    return nab_score(files, profile, float(sweep.thresholds[sweep.best_index]))


def nab_normalize(raw_score, null_score: float, perfect_score: float):
    """Scale raw scores so that ``null_score`` maps to 0 and ``perfect_score`` to 100."""
    if perfect_score == null_score:
        raise ValueError("cannot normalise: the corpus has no labelled window, so null and perfect scores are equal")
    scaled = 100.0 * (np.asarray(raw_score, dtype=float) - null_score) / (perfect_score - null_score)
    return float(scaled) if scaled.ndim == 0 else scaled


def _nab_bounds(files: Sequence[NabFileScores], profile: NabProfile) -> tuple[float, float]:
    windows = sum(len(file.weights.windows) for file in files)
    return -profile.fn_weight * windows, profile.tp_weight * windows


def _nab_scored_rows(files: Sequence[NabFileScores], profile: NabProfile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate the scored rows of all files with non-NaN scores.

    Returns the scores, each row's value when flagged (A_TP times its weight inside a window,
    A_FP times its factor outside) and a corpus-wide window index (-1 outside windows).
    """
    scores, values, window_ids = [], [], []
    window_offset = 0
    for file in files:
        weights = file.weights
        file_scores = np.asarray(file.scores, dtype=float)[weights.probation :]
        window_of_row = weights.window_of_row[weights.probation :]
        inside = window_of_row >= 0
        row_values = np.where(
            inside,
            profile.tp_weight * weights.tp_weight[weights.probation :],
            profile.fp_weight * weights.fp_factor[weights.probation :],
        )
        if np.isposinf(file_scores).any():
            raise ValueError(f"invalid scores in {file.name}: +inf would be flagged even by the 'flag nothing' threshold")
        kept = ~np.isnan(file_scores)
        scores.append(file_scores[kept])
        values.append(row_values[kept])
        window_ids.append(np.where(inside, window_of_row + window_offset, -1)[kept])
        window_offset += len(weights.windows)
    if not scores:
        return np.empty(0), np.empty(0), np.empty(0, dtype=np.int64)
    return np.concatenate(scores), np.concatenate(values), np.concatenate(window_ids)


def _check_nab_windows(windows: Sequence[tuple[int, int]], n_rows: int) -> np.ndarray:
    bounds = np.array(sorted((int(first), int(last)) for first, last in windows), dtype=np.int64).reshape(-1, 2)
    for first, last in bounds:
        if not 0 <= first <= last < n_rows:
            raise ValueError(f"invalid window rows [{first}, {last}]: expected 0 <= first <= last < {n_rows}")
    overlapping = np.flatnonzero(bounds[1:, 0] <= bounds[:-1, 1])
    if len(overlapping):
        k = overlapping[0]
        raise ValueError(
            f"invalid windows: rows [{bounds[k, 0]}, {bounds[k, 1]}] and [{bounds[k + 1, 0]}, {bounds[k + 1, 1]}] overlap"
        )
    return bounds
