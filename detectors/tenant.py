"""Tenant detector: seasonal baselines per tenant and metric, combined into one tenant score.

The input is a panel whose rows are (tenant, metric) series. A ``SeasonalDetector`` fits every
row at once; each row's signed deviation in band units (1 = band edge) is smoothed with a
short rolling median so that a single noisy sample cannot alert. A tenant's score is the
maximum of its metrics' scores. The maximum keeps the meaning of 1 and 2 that every other
detector has (one metric at its band edge gives 1, and more metrics at 1 still give 1), so the
shipped alert rules apply unchanged. Joint moderate deviations of several metrics, which the
maximum misses, are the job of the multivariate signal. It is the larger of two scores: one
IsolationForest shared by all tenants over their vectors of standardised residuals, and the
sum of those residuals against its own calibrated spread.

The sum is there because the forest cannot score far-out vectors high. A vector beyond every
training sample is isolated within a split or two, whether it is a little or very far out.
So the raw score is capped, and its calibrated map stayed at or below 1.28 for every anomaly
in the simulation of tests/test_tenant.py. A shift of every metric by 1.5 noise standard
deviations then reached 1 in 4 % to 88 % of its samples, depending on the simulated data. The
scaled sum grows linearly with such a shift, so its score keeps the meaning of 1 and 2 that
every other score has.

Peer groups live in ``detectors.peers`` and the noisy-neighbour search in
``detectors.noisy_neighbor``; ``classify_anomalies`` here names the kind of each anomaly.
"""

from dataclasses import dataclass
from typing import ClassVar, Literal, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sklearn.ensemble import IsolationForest

from detectors._stats import row_quantiles
from detectors.base import STATE_FORMAT_VERSION, Detector, Scores, StateError, check_panel
from detectors.seasonal import MAX_SCORE, SeasonalDetector, SeasonalParams
from exporter.durations import parse_duration

# Metric names the tenant detector understands, in the order of the metric axis of its outputs.
METRICS = ("cpu", "memory", "network_in", "network_out", "disk_io", "request_rate", "latency")

# Anomaly kinds returned by ``classify_anomalies``; the code of a kind is its index.
ANOMALY_TYPES = ("resource_exhaustion", "network_spike", "cpu_spike", "behavioural")
NOT_ANOMALOUS = -1

# Standardised residuals beyond this many band widths are clipped before the IsolationForest,
# so one huge deviation does not stretch the trees' split ranges.
RESIDUAL_CLIP = 10.0

# Features of the multivariate model beyond one per metric: the scaled sum and the root mean square.
JOINT_FEATURES = 2

# The joint shift's warning edge, as a multiple of its calibration quantile. At 1, 10 to 16 of
# 50 clean tenants in tests/test_tenant.py crossed 1 within a day, and at 1.25, 0 to 2 did.
JOINT_EDGE_MARGIN = 1.25

# Minimum held-out columns to train and calibrate the multivariate model on.
MIN_CALIBRATION_COLUMNS = 12

# Residual vectors kept from the calibration window to train and calibrate the shared model.
MAX_CALIBRATION_VECTORS = 20_000


class TenantParams(BaseModel):
    """Parameters of the ``tenant`` detector type."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seasonal: SeasonalParams = SeasonalParams()
    """Baseline of every (tenant, metric) series; ``band_sigmas`` sets where score 1 lies."""

    directions: dict[str, Literal["both", "up", "down"]] = {}
    """Side of the band that counts per metric, for example ``{latency: up}``; others use both."""

    transform: Literal["log", "none"] = "log"
    """``log`` fits the baselines on log(value + offset), which suits usage metrics whose noise
    grows with their level. The band is then a ratio. ``seasonal.min_spread_ratio`` has little
    effect on the log scale because the transformed series sit near 0."""

    log_offset_ratio: float = Field(default=0.1, gt=0)
    """Offset added before the log, as a share of the series' median in the fit window, so that
    samples near 0 do not turn small absolute changes into huge ratios."""

    smoothing_points: int = Field(default=5, ge=1, le=60)
    """Samples in the rolling median of each metric's deviation; 1 turns smoothing off."""

    calibration: str = "1d"
    """Newest part of the fit window held out to train and calibrate the multivariate model."""

    multivariate_warning_rate: float = Field(default=0.0027, gt=0, lt=0.5)
    """Share of calibration vectors whose forest score reaches 1 (0.0027 matches a 3-sigma band).

    The joint shift's edge is ``JOINT_EDGE_MARGIN`` times its calibration quantile at this rate."""

    n_estimators: int = Field(default=100, ge=10, le=1000)
    """Trees of the shared IsolationForest."""

    random_state: int = 0
    """Seed of the IsolationForest and of the calibration subsample, so refits are reproducible."""

    @field_validator("directions")
    @classmethod
    def _known_metrics(cls, value: dict) -> dict:
        unknown = sorted(set(value) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metric names {unknown}: expected some of {', '.join(METRICS)}")
        return value

    @field_validator("calibration")
    @classmethod
    def _positive_duration(cls, value: str) -> str:
        if parse_duration(value) <= 0:
            raise ValueError(f"expected a positive duration, got {value!r}")
        return value


@dataclass(frozen=True)
class TenantScores:
    """Results of one ``TenantDetector.score`` call.

    Tenant arrays have shape (tenants, time) and metric arrays (tenants, metrics, time), with
    tenants in the order of ``tenants`` and metrics in the order of ``metrics``. NaN marks a
    tenant, metric or time without a ready model or without data.
    """

    tenants: tuple[str, ...]
    metrics: tuple[str, ...]
    signed: np.ndarray
    """Smoothed signed deviation per metric in band units: +1 is the upper band edge, -1 the lower."""
    metric_score: np.ndarray
    """Unsigned per-metric score after the metric's direction: 0 as expected, 1 warning, 2 critical."""
    score: np.ndarray
    """Combined tenant score: the maximum of ``metric_score`` over metrics."""
    contribution: np.ndarray
    """Per-metric share of the squared metric scores; sums to 1 where ``score`` is positive, else 0."""
    multivariate: np.ndarray
    """Multivariate score on the same 0/1/2 scale: the larger of the shared IsolationForest's
    score of the tenant's residual vector and the score of the residuals' scaled sum.

    NOTE: weak at scale. In bench/tenants.py (200 tenants, weekly cycle) a 1.5-sigma shift of
    every metric peaked at 0.56, because seasonal profile errors shared by a tenant's metrics
    widen the edge of the sum."""
    series: Scores
    """Per-row baseline results of the seasonal detector, rows in the order of the input panel."""


def combine_scores(metric_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Combine per-metric scores (axis 1) into a tenant score and per-metric contribution ratios.

    The score is the maximum over metrics, NaN when every metric is NaN. A contribution is the
    metric's share of the squared scores, so the metric that drives the maximum dominates: a
    metric at 3 next to one at 0.3 gets 99 % rather than 91 %.

    >>> score, share = combine_scores(np.array([[[1.0], [0.0], [np.nan]]]))
    >>> float(score[0, 0]), share[0, :, 0].tolist()
    (1.0, [1.0, 0.0, 0.0])
    """
    filled = np.nan_to_num(metric_score, nan=0.0)
    has_any = ~np.all(np.isnan(metric_score), axis=1)
    score = np.where(has_any, filled.max(axis=1, initial=0.0), np.nan)
    squares = filled**2
    total = squares.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        contribution = np.where(total > 0, squares / total, 0.0)
    return score, contribution


def classify_anomalies(
    signed: np.ndarray,
    metrics: Sequence[str],
    anomalous: np.ndarray,
    *,
    threshold: float = 1.0,
) -> np.ndarray:
    """Name the kind of each anomalous (tenant, time) point; return codes into ANOMALY_TYPES.

    ``signed`` is (tenants, metrics, time) as in ``TenantScores.signed`` and ``anomalous`` a
    boolean (tenants, time) mask, for example ``score >= 1``. A metric is high when its
    signed deviation is at least ``threshold``. The first rule that matches wins:

    1. resource_exhaustion: CPU and memory both high;
    2. network_spike: network_in or network_out high;
    3. cpu_spike: CPU high;
    4. behavioural: anything else, which deviates without saturating a resource (a drop in
       request rate, a latency rise, memory alone, a shift that only the multivariate or
       peer score detects).

    Points that are not anomalous get NOT_ANOMALOUS (-1).
    """
    metrics = list(metrics)
    if signed.ndim != 3 or signed.shape[1] != len(metrics):
        raise ValueError(f"signed must be (tenants, {len(metrics)} metrics, time), got shape {signed.shape}")

    def high(name: str) -> np.ndarray:
        if name not in metrics:
            return np.zeros(anomalous.shape, dtype=bool)
        with np.errstate(invalid="ignore"):
            return signed[:, metrics.index(name), :] >= threshold

    cpu, memory = high("cpu"), high("memory")
    network = high("network_in") | high("network_out")
    codes = np.full(anomalous.shape, ANOMALY_TYPES.index("behavioural"), dtype=np.int8)
    codes = np.where(cpu, ANOMALY_TYPES.index("cpu_spike"), codes)
    codes = np.where(network, ANOMALY_TYPES.index("network_spike"), codes)
    codes = np.where(cpu & memory, ANOMALY_TYPES.index("resource_exhaustion"), codes)
    return np.where(anomalous, codes, NOT_ANOMALOUS).astype(np.int8)


def tenant_layout(tenants: Sequence[str], metrics: Sequence[str]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Map panel rows to (tenant index, metric index) with tenants sorted and metrics in METRICS order.

    Returns (tenant ids, the two index arrays stacked as shape (2, rows), metric names).
    Raises ValueError for an unknown metric name, a length mismatch or a duplicate row.
    """
    tenants = np.asarray(tenants, dtype=str)
    metrics = np.asarray(metrics, dtype=str)
    if tenants.shape != metrics.shape or tenants.ndim != 1:
        raise ValueError(f"tenants and metrics must be 1-D with one entry per row, got {tenants.shape} and {metrics.shape}")
    unknown = sorted(set(metrics.tolist()) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric names {unknown}: expected some of {', '.join(METRICS)}")
    tenant_ids, tenant_index = np.unique(tenants, return_inverse=True)
    present = tuple(name for name in METRICS if name in set(metrics.tolist()))
    metric_index = np.array([present.index(name) for name in metrics], dtype=np.int64)
    pairs = tenant_index * len(present) + metric_index
    unique_pairs, counts = np.unique(pairs, return_counts=True)
    if np.any(counts > 1):
        first = int(unique_pairs[np.argmax(counts > 1)])
        raise ValueError(
            f"duplicate row for tenant {str(tenant_ids[first // len(present)])!r} and metric "
            f"{present[first % len(present)]!r}: expected one series per tenant and metric"
        )
    return tenant_ids, np.stack([tenant_index, metric_index]), present


def to_cube(rows: np.ndarray, layout: np.ndarray, n_tenants: int, n_metrics: int) -> np.ndarray:
    """Scatter (rows, time) values into a (tenants, metrics, time) cube, NaN where no row exists."""
    cube = np.full((n_tenants, n_metrics, rows.shape[1]), np.nan)
    cube[layout[0], layout[1]] = rows
    return cube


def joint_shift(signed: np.ndarray) -> np.ndarray:
    """Return the sum of each tenant's metric deviations over the square root of their count.

    ``signed`` has shape (tenants, metrics, time); the result is (tenants, time), NaN where the
    tenant has no metric. Deviations are clipped to ``RESIDUAL_CLIP`` first, so one huge metric
    cannot stand for a joint shift alone. Independent noise keeps the spread of the sum that of
    one metric, while a shift of every metric in the same direction adds up.
    """
    clipped = np.clip(signed, -RESIDUAL_CLIP, RESIDUAL_CLIP)
    count = np.sum(~np.isnan(clipped), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.nansum(clipped, axis=1) / np.sqrt(count), np.nan)


def rolling_median(history: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Return the trailing median of ``values`` (rows, time) over ``history.shape[1] + 1`` samples.

    ``history`` contains the samples before the first column (NaN where unknown). NaN is ignored
    inside a window, but a column whose own value is NaN gives NaN, so a series without a
    current sample has no score.
    """
    width = history.shape[1] + 1
    if width == 1:
        return values.copy()
    joined = np.concatenate([history, values], axis=1)
    windows = sliding_window_view(joined, width, axis=1)
    ordered = np.sort(windows, axis=2)
    count = np.sum(~np.isnan(windows), axis=2)
    low = np.maximum((count - 1) // 2, 0)
    high = np.maximum(count // 2, 0)
    pick_low = np.take_along_axis(ordered, low[..., None], axis=2)[..., 0]
    pick_high = np.take_along_axis(ordered, high[..., None], axis=2)[..., 0]
    return np.where((count > 0) & ~np.isnan(values), (pick_low + pick_high) / 2, np.nan)


class TenantDetector(Detector):
    """Per-tenant anomaly scores from seasonal baselines of each tenant's metrics.

    Parameters
    ----------
    params : TenantParams
        ``seasonal`` configures the baseline of every (tenant, metric) series.
        ``smoothing_points`` sets the rolling median of deviations. ``calibration`` is the
        held-out end of the fit window that trains the shared IsolationForest.
    step : float
        Seconds between samples.
    timezone : str
        IANA zone whose local clock the daily and weekly cycles follow.
    direction : str
        Must be "both": per-metric sides are set by ``params.directions``.

    Examples
    --------
    >>> import numpy as np
    >>> step = 300.0
    >>> t = np.arange(0, 5 * 86400, step)
    >>> rng = np.random.default_rng(0)
    >>> day = np.sin(2 * np.pi * t / 86400)
    >>> rows = np.stack([10 + 4 * day, 50 + 9 * day, 8 + day, 40 + 5 * day]) + rng.normal(0, 0.3, (4, t.size))
    >>> tenants, metrics = ["a", "a", "b", "b"], ["cpu", "memory", "cpu", "memory"]
    >>> detector = TenantDetector(TenantParams(), step=step)
    >>> detector = detector.fit(rows[:, :-12], t[:-12], tenants=tenants, metrics=metrics)
    >>> new = rows[:, -12:].copy()
    >>> new[2, 4:8] += 5.0
    >>> result = detector.score(new, t[-12:], tenants=tenants, metrics=metrics)
    >>> bool(result.score[1, 6] > 2), bool(np.nanmax(result.score[0]) < 1)
    (True, True)
    >>> result.metrics, round(float(result.contribution[1, 0, 6]), 2)
    (('cpu', 'memory'), 1.0)
    """

    Params = TenantParams
    type_name: ClassVar[str] = "tenant"

    def __init__(self, params: TenantParams, *, step: float, timezone: str = "UTC", direction: str = "both"):
        if direction != "both":
            raise ValueError(
                f"invalid direction {direction!r} for the tenant detector: expected 'both'. "
                "Set a side per metric with params.directions instead"
            )
        super().__init__(params, step=step, timezone=timezone, direction=direction)

    # --- fit -----------------------------------------------------------------------------------

    def fit(self, values, timestamps, *, tenants: Sequence[str], metrics: Sequence[str]) -> "TenantDetector":
        """Fit the baselines on all but the newest ``calibration``, then train the shared model on it.

        Scoring the held-out end also moves each baseline's level up to the end of the window,
        so ``score`` continues where the data stops.
        """
        values, timestamps = check_panel(values, timestamps, step=self.step)
        tenant_ids, layout, present = tenant_layout(tenants, metrics)
        if values.shape[0] != layout.shape[1]:
            raise ValueError(f"values has {values.shape[0]} rows but tenants and metrics have {layout.shape[1]}")
        self.tenants_ = tuple(tenant_ids.tolist())
        self.metrics_ = present
        self.layout_ = layout
        self.row_keys_ = {(self.tenants_[t], present[m]): row for row, (t, m) in enumerate(layout.T)}

        held_out = min(int(round(parse_duration(self.params.calibration) / self.step)), timestamps.size // 4)
        if held_out < MIN_CALIBRATION_COLUMNS:
            raise ValueError(
                f"fit window of {timestamps.size} columns is too short: the held-out part is "
                f"min(calibration, a quarter of the window) and needs at least {MIN_CALIBRATION_COLUMNS} "
                f"columns, so pass at least {4 * MIN_CALIBRATION_COLUMNS} columns"
            )
        cut = timestamps.size - held_out
        self.seasonal_ = SeasonalDetector(self.params.seasonal, step=self.step, timezone=self.timezone)
        self._fit_transform(values[:, :cut])
        transformed = self._transform(values)
        self.seasonal_.fit(transformed[:, :cut], timestamps[:cut])
        calibration = self.seasonal_.score(transformed[:, cut:], timestamps[cut:])
        signed = _signed_deviation(transformed[:, cut:], calibration)
        self.recent_signed_ = np.full((values.shape[0], self.params.smoothing_points - 1), np.nan)
        self.recent_signed_ = self._keep_recent(signed)

        vectors, has_data = self._residual_vectors(signed)
        self._fit_multivariate(vectors[has_data])
        # The warning edge of the joint shift, from the smoothed deviations it is scored on.
        smoothed = rolling_median(np.full((values.shape[0], self.params.smoothing_points - 1), np.nan), signed)
        joint = np.abs(joint_shift(to_cube(smoothed, layout, len(self.tenants_), len(present))))
        joint = joint[np.isfinite(joint)]
        edge = 1.0
        if joint.size:
            edge = float(np.quantile(joint, 1.0 - self.params.multivariate_warning_rate))
        self.joint_width_ = max(JOINT_EDGE_MARGIN * edge, 1e-6)
        self.recent_multivariate_ = np.full((len(self.tenants_), self.params.smoothing_points - 1), np.nan)
        return self

    def _fit_transform(self, values: np.ndarray) -> None:
        """Choose per row the reference (the median, else the 95th percentile, else 1) and the offset of the log."""
        median, p95 = row_quantiles(values, [0.5, 0.95]).T
        reference = np.where(median > 0, median, np.where(p95 > 0, p95, 1.0))
        self.log_reference_ = reference
        self.log_offset_ = self.params.log_offset_ratio * reference

    def _transform(self, values: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Return log((value + offset) / (reference + offset)), or the values with ``transform: none``.

        Negative values count as 0: every supported metric is a non-negative usage or rate.
        """
        if self.params.transform == "none":
            return values
        rows = slice(None) if rows is None else rows
        offset = self.log_offset_[rows][:, None]
        with np.errstate(invalid="ignore"):
            return np.log((np.maximum(values, 0.0) + offset) / (self.log_reference_[rows][:, None] + offset))

    def _inverse(self, transformed: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if self.params.transform == "none":
            return transformed
        offset = self.log_offset_[rows][:, None]
        return np.exp(transformed) * (self.log_reference_[rows][:, None] + offset) - offset

    def _keep_recent(self, signed: np.ndarray) -> np.ndarray:
        keep = self.params.smoothing_points - 1
        if keep == 0:
            return np.zeros((signed.shape[0], 0))
        joined = np.concatenate([self.recent_signed_, signed], axis=1)
        return joined[:, joined.shape[1] - keep :]

    def _residual_vectors(self, signed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Turn (fitted rows, time) signed deviations into (tenants, time, features) model inputs.

        Also returns the (tenants, time) mask of vectors with at least one metric present.

        The features are each metric's deviation (0 where missing), then two joint ones: the
        sum over the tenant's metrics divided by the square root of their count, and the root
        mean square. Trees split one feature at a time, so a moderate shift of every metric
        would hide between the axes. The sum turns it into one clear deviation.
        """
        cube = to_cube(signed, self.layout_, len(self.tenants_), len(self.metrics_))
        cube = np.clip(cube, -RESIDUAL_CLIP, RESIDUAL_CLIP)
        count = np.sum(~np.isnan(cube), axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            joint = np.where(count > 0, np.nansum(cube, axis=1) / np.sqrt(count), 0.0)
            rms = np.where(count > 0, np.sqrt(np.nansum(cube**2, axis=1) / count), 0.0)
        features = np.concatenate([np.nan_to_num(cube, nan=0.0), joint[:, None, :], rms[:, None, :]], axis=1)
        return features.transpose(0, 2, 1), count > 0

    def _fit_multivariate(self, flat: np.ndarray) -> None:
        """Train the shared IsolationForest on half the calibration vectors and calibrate on the rest.

        One model for all tenants: the residuals are already in band units per series, so
        normal behaviour looks alike across tenants, and the cost stays that of one forest
        whatever the tenant count. Per-tenant models would need one fit per tenant and could
        not score a tenant that appears after the fit.
        """
        if flat.shape[0] < 2 * MIN_CALIBRATION_COLUMNS:
            raise ValueError(
                f"only {flat.shape[0]} residual vectors in the calibration window: "
                "the series have too few values there to train the multivariate model"
            )
        rng = np.random.default_rng(self.params.random_state)
        order = rng.permutation(flat.shape[0])[:MAX_CALIBRATION_VECTORS]
        half = order.size // 2
        self.training_vectors_ = flat[order[:half]].astype(np.float32)
        self.forest_ = self._new_forest().fit(self.training_vectors_)
        held_out = -self.forest_.score_samples(flat[order[half:]])
        self.multivariate_centre_ = float(np.median(held_out))
        warning = float(np.quantile(held_out, 1.0 - self.params.multivariate_warning_rate))
        self.multivariate_width_ = max(warning - self.multivariate_centre_, 1e-6)

    def _new_forest(self) -> IsolationForest:
        return IsolationForest(n_estimators=self.params.n_estimators, random_state=self.params.random_state)

    @property
    def ready_(self) -> np.ndarray:
        return self.seasonal_.ready_

    # --- score ---------------------------------------------------------------------------------

    def score(self, values, timestamps, rows=None, *, tenants: Sequence[str], metrics: Sequence[str]) -> TenantScores:
        """Score new columns of a panel whose rows are (tenant, metric) series known from the fit.

        ``rows`` is ignored: rows are matched to the fit by their tenant and metric. Rows the
        fit did not see get NaN and take no part in any tenant's score.
        """
        values, timestamps = check_panel(values, timestamps, step=self.step)
        tenant_ids = np.asarray(tenants, dtype=str)
        metric_names = np.asarray(metrics, dtype=str)
        if tenant_ids.shape != (values.shape[0],) or metric_names.shape != (values.shape[0],):
            raise ValueError(f"tenants and metrics must have one entry per row ({values.shape[0]})")
        fitted_rows = np.array(
            [self.row_keys_.get((t, m), -1) for t, m in zip(tenant_ids.tolist(), metric_names.tolist())],
            dtype=np.int64,
        )
        known = fitted_rows >= 0
        if np.unique(fitted_rows[known]).size != np.count_nonzero(known):
            raise ValueError("duplicate (tenant, metric) rows in the panel: expected one series per tenant and metric")

        series = _empty_scores(values.shape)
        signed_rows = np.full(values.shape, np.nan)
        if known.any():
            transformed = self._transform(values[known], fitted_rows[known])
            seasonal = self.seasonal_.score(transformed, timestamps, rows=fitted_rows[known])
            series.score[known] = seasonal.score
            for name in ("expected", "lower", "upper"):
                getattr(series, name)[known] = self._inverse(getattr(seasonal, name), fitted_rows[known])
            signed_rows[known] = _signed_deviation(transformed, seasonal)

        # Deviations per fitted row, NaN for fitted rows missing from this panel.
        signed_fitted = np.full((self.layout_.shape[1], values.shape[1]), np.nan)
        signed_fitted[fitted_rows[known]] = signed_rows[known]
        smoothed = rolling_median(self.recent_signed_, signed_fitted)
        self.recent_signed_ = self._keep_recent(signed_fitted)

        n_tenants, n_metrics = len(self.tenants_), len(self.metrics_)
        signed = to_cube(smoothed, self.layout_, n_tenants, n_metrics)
        metric_score = np.minimum(self._directional(signed), MAX_SCORE)
        score, contribution = combine_scores(metric_score)
        joint = np.minimum(np.abs(joint_shift(signed)) / self.joint_width_, MAX_SCORE)
        multivariate = np.fmax(self._multivariate(signed_fitted), joint)
        return TenantScores(
            tenants=self.tenants_,
            metrics=self.metrics_,
            signed=signed,
            metric_score=metric_score,
            score=score,
            contribution=contribution,
            multivariate=multivariate,
            series=series,
        )

    def _directional(self, signed: np.ndarray) -> np.ndarray:
        result = np.abs(signed)
        for index, name in enumerate(self.metrics_):
            side = self.params.directions.get(name, "both")
            if side == "up":
                result[:, index] = np.maximum(signed[:, index], 0.0)
            elif side == "down":
                result[:, index] = np.maximum(-signed[:, index], 0.0)
        return result

    def _multivariate(self, signed_fitted: np.ndarray) -> np.ndarray:
        vectors, has_data = self._residual_vectors(signed_fitted)
        n_tenants, width, _ = vectors.shape
        raw = -self.forest_.score_samples(vectors.reshape(-1, vectors.shape[-1])).reshape(n_tenants, width)
        mapped = np.maximum(raw - self.multivariate_centre_, 0.0) / self.multivariate_width_
        mapped = np.where(has_data, np.minimum(mapped, MAX_SCORE), np.nan)
        smoothed = rolling_median(self.recent_multivariate_, mapped)
        keep = self.params.smoothing_points - 1
        joined = np.concatenate([self.recent_multivariate_, mapped], axis=1)
        self.recent_multivariate_ = joined[:, joined.shape[1] - keep :] if keep else joined[:, :0]
        return smoothed

    # --- state ---------------------------------------------------------------------------------

    def get_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Return the fitted state as arrays and JSON; the forest is stored as its training vectors."""
        seasonal_arrays, seasonal_meta = self.seasonal_.get_state()
        arrays = {f"seasonal_{name}": array for name, array in seasonal_arrays.items()}
        arrays.update(
            layout=self.layout_,
            recent_signed=self.recent_signed_,
            recent_multivariate=self.recent_multivariate_,
            training_vectors=self.training_vectors_,
            log_reference=self.log_reference_,
            log_offset=self.log_offset_,
        )
        meta = {
            "format_version": STATE_FORMAT_VERSION,
            "type": self.type_name,
            "tenants": list(self.tenants_),
            "metrics": list(self.metrics_),
            "multivariate_centre": self.multivariate_centre_,
            "multivariate_width": self.multivariate_width_,
            "joint_width": self.joint_width_,
            "seasonal": seasonal_meta,
        }
        return arrays, meta

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict) -> "TenantDetector":
        """Restore state saved by ``get_state`` and refit the forest on the stored training vectors.

        The refit uses the same vectors and ``random_state``, so it rebuilds the same trees.
        """
        if meta.get("format_version") != STATE_FORMAT_VERSION or meta.get("type") != self.type_name:
            raise StateError(
                f"state is for type {meta.get('type')!r} format {meta.get('format_version')!r}, "
                f"expected {self.type_name!r} format {STATE_FORMAT_VERSION}"
            )
        try:
            tenants = tuple(str(name) for name in meta["tenants"])
            metrics = tuple(str(name) for name in meta["metrics"])
            layout = np.asarray(arrays["layout"], dtype=np.int64)
            log_reference = np.asarray(arrays["log_reference"], dtype=np.float64)
            log_offset = np.asarray(arrays["log_offset"], dtype=np.float64)
            recent_signed = np.asarray(arrays["recent_signed"], dtype=np.float64)
            recent_multivariate = np.asarray(arrays["recent_multivariate"], dtype=np.float64)
            training = np.asarray(arrays["training_vectors"], dtype=np.float32)
            centre = float(meta["multivariate_centre"])
            width = float(meta["multivariate_width"])
            joint_width = float(meta["joint_width"])
            seasonal_arrays = {
                name.removeprefix("seasonal_"): array for name, array in arrays.items() if name.startswith("seasonal_")
            }
            seasonal_meta = dict(meta["seasonal"])
        except (KeyError, TypeError, ValueError) as error:
            raise StateError(f"state is incomplete or malformed: {error}") from None

        unknown = sorted(set(metrics) - set(METRICS))
        keep = self.params.smoothing_points - 1
        if unknown:
            raise StateError(f"state has unknown metric names {unknown}")
        if layout.ndim != 2 or layout.shape[0] != 2:
            raise StateError(f"state array 'layout' has shape {layout.shape}, expected (2, rows)")
        n_rows = layout.shape[1]
        if n_rows and (layout[0].max() >= len(tenants) or layout[1].max() >= len(metrics) or layout.min() < 0):
            raise StateError("state array 'layout' points outside the stored tenants or metrics")
        expected_shapes = {
            "recent_signed": (recent_signed.shape, (n_rows, keep)),
            "recent_multivariate": (recent_multivariate.shape, (len(tenants), keep)),
            "log_reference": (log_reference.shape, (n_rows,)),
            "log_offset": (log_offset.shape, (n_rows,)),
        }
        for name, (actual, wanted) in expected_shapes.items():
            if actual != wanted:
                raise StateError(f"state array {name!r} has shape {actual}, expected {wanted}")
        if training.ndim != 2 or training.shape[1] != len(metrics) + JOINT_FEATURES or training.shape[0] < 2:
            raise StateError(
                f"state array 'training_vectors' has shape {training.shape}, expected (n, {len(metrics) + JOINT_FEATURES})"
            )
        if not (np.all(log_reference > 0) and np.all(log_offset > 0) and np.all(np.isfinite(log_reference + log_offset))):
            raise StateError("invalid state: non-finite or non-positive log reference or offset values")
        if not (np.all(np.isfinite(training)) and np.isfinite(centre) and np.isfinite(width) and width > 0
                and np.isfinite(joint_width) and joint_width > 0):
            raise StateError("invalid state: non-finite multivariate calibration values")

        seasonal = SeasonalDetector(self.params.seasonal, step=self.step, timezone=self.timezone)
        seasonal.set_state(seasonal_arrays, seasonal_meta)
        if seasonal.level_.shape[0] != n_rows:
            raise StateError(f"seasonal state has {seasonal.level_.shape[0]} rows, expected {n_rows}")

        self.seasonal_ = seasonal
        self.tenants_, self.metrics_, self.layout_ = tenants, metrics, layout
        self.row_keys_ = {(tenants[t], metrics[m]): row for row, (t, m) in enumerate(layout.T)}
        self.recent_signed_, self.recent_multivariate_ = recent_signed, recent_multivariate
        self.training_vectors_ = training
        self.log_reference_, self.log_offset_ = log_reference, log_offset
        self.forest_ = self._new_forest().fit(training)
        self.multivariate_centre_, self.multivariate_width_ = centre, width
        self.joint_width_ = joint_width
        return self


def _signed_deviation(values: np.ndarray, scores: Scores) -> np.ndarray:
    """Return (value - expected) in band widths: +1 at the upper edge, -1 at the lower one."""
    half_width = scores.upper - scores.expected
    with np.errstate(invalid="ignore", divide="ignore"):
        signed = (values - scores.expected) / half_width
    return np.clip(signed, -MAX_SCORE, MAX_SCORE)


def _empty_scores(shape: tuple[int, int]) -> Scores:
    return Scores(*(np.full(shape, np.nan) for _ in range(4)))
