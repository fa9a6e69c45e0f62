"""Equipment: multivariate control limits and an optional autoencoder over window features.

A panel row is one sensor of one piece of equipment (the entity). Each row is summarised by
statistics over a sliding window (mean, std, min, max, range, skewness, kurtosis, plus a
dominant frequency and band energies for vibration sensors sampled fast enough). Fitting on
normal operation learns a control chart per feature, an EWMA chart per sensor for slow drift
and, when configured, a dense autoencoder over an entity's standardised features.

Each chart's spread is the training spread widened for autocorrelation: a series whose
``n`` values carry only ``n_eff`` independent ones (AR(1) approximation, ``n_eff = n (1 - r) /
(1 + r)`` with ``r`` the lag-1 autocorrelation) understates its variance by about the factor
``1 - 1 / n_eff``, and a new value varies around the estimated mean by ``1 + 1 / n_eff``
times it. Slowly wandering sensors, such as temperatures, thereby get wide limits.

With ``calibration_share`` above 0, fitting first holds out the newest part of the window:
limits learnt on the older part score it, and each sensor's and entity's warning edge moves
out (never in) until at most ``false_alarm_rate`` of the held-out scores reach it. The limits
are then refitted on the whole window, and the edges keep their calibration factors.

Score scale, shared with every detector type (1 = warning edge, 2 = critical edge):

* Control charts: a deviation of ``z`` standard deviations scores ``z / 2`` up to ``z = 2``
  and ``1 + (z - 2)`` beyond, so 2 sigma is 1 and 3 sigma is 2. With ``family_correction``,
  the largest ``z`` of an entity's (or a sensor's) ``m`` charts is first turned into the
  ``z`` of one chart with the same false-alarm probability (Sidak). An entity with 60 charts
  is then not at its warning edge whenever one of them passes 2 sigma. A calibration factor
  ``c`` divides the deviation first, so the warning edge sits at ``2 c``.
* Autoencoder: the root mean square reconstruction error, divided by its
  ``autoencoder_quantile`` over the training data, is the error ratio ``r``. The score is ``r``
  up to 1 and ``1 + 2 (r - 1)`` beyond: ``r`` is read as ``z / 2``, so the critical edge sits
  at 1.5 times the warning error, as 3 sigma is 1.5 times 2 sigma on a control chart. With
  calibration, the autoencoder learns from the older part only, and the warning error is the
  larger of that quantile and the ``1 - false_alarm_rate`` quantile of the held-out errors.
* ``both``: the larger of the two scores.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from scipy import special

from detectors import _autoencoder
from detectors._features import (
    LOCATION_FEATURES,
    SHAPE_FEATURES,
    SPREAD_FEATURES,
    STAT_FEATURES,
    chart_score,
    value_resolution,
    window_statistics,
)
from detectors._stats import row_quantiles
from detectors._vibration import MIN_FFT_SAMPLES, spectral_window_features
from detectors.base import STATE_FORMAT_VERSION, Detector, Scores, StateError, check_panel
from exporter.durations import parse_duration

# Minimum samples per window, because skewness and kurtosis of fewer are mostly noise.
MIN_WINDOW_SAMPLES = 5

# Floor of the spread of skewness and kurtosis, which have no unit.
SHAPE_SPREAD_FLOOR = 0.25

# Two-sided 99% quantile of the standard normal distribution: a feature's spread is at least
# its 99th percentile absolute deviation divided by this, so heavy tails widen the limits.
NORMAL_Q99 = 2.5758

# Maximum deviation the family correction evaluates exactly. Beyond it the normal tail
# probability comes near the smallest float64, so the corrected z grows one for one.
MAX_EXACT_Z = 37.0

# Scores are capped here, as in the seasonal detector.
MAX_SCORE = 100.0

# Minimum number of complete training feature vectors to train the autoencoder on.
MIN_AUTOENCODER_SAMPLES = 50

# Largest factor by which autocorrelation widens a chart's spread. Without the cap the factor
# grows without bound as the effective number of independent training values falls to 1.
MAX_SPREAD_INFLATION = 10.0

# Minimum number of held-out scores a calibration quantile is taken from. A score with fewer
# keeps its uncalibrated edge.
MIN_CALIBRATION_SAMPLES = 20

# Deviation, in standard deviations, at the warning edge of an uncalibrated chart.
WARNING_Z = 2.0


class EquipmentParams(BaseModel):
    """Parameters of the ``equipment`` detector type (the ``params`` key of a detector)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["limits", "autoencoder", "both"] = "limits"
    """Control limits per feature, a dense autoencoder (needs TensorFlow), or the larger of both."""

    window: str = "15m"
    """Length of the sliding window the features summarise; at least 5 steps."""

    min_history: str = "2h"
    """History with data a sensor needs at fit time before it is scored."""

    ewma_lambda: float | None = Field(default=0.05, gt=0, lt=1)
    """Weight of the newest sample in the EWMA drift chart of each sensor; None turns it off.
    Smaller values catch smaller, slower drifts later."""

    family_correction: bool = True
    """Correct the largest of an entity's or a sensor's chart deviations for their number (Sidak)."""

    min_spread_ratio: float = Field(default=0.01, ge=0)
    """Floor of the spread of the location features (mean, min, max) as a share of the sensor's level."""

    vibration_sensors: list[str] = []
    """Sensor names that carry raw vibration samples and get FFT features."""

    spectral_bands_hz: list[tuple[float, float]] = []
    """Frequency bands ``[low, high)`` in Hz whose energy is a feature of each vibration sensor."""

    autoencoder_quantile: float = Field(default=0.99, gt=0.5, lt=1)
    """Quantile of the training reconstruction error that is the autoencoder's warning edge.
    Calibration can only raise the edge."""

    autoencoder_epochs: int = Field(default=200, ge=1, le=10000)
    """Most training epochs; training stops earlier when the validation loss stalls for 10."""

    autoencoder_batch_size: int = Field(default=32, ge=1)
    """Samples per gradient step of the autoencoder."""

    seed: int = 0
    """Seed of the autoencoder's weight initialisation and shuffling."""

    calibration_share: float = Field(default=0.25, ge=0, le=0.5)
    """Share of the fit window's newest samples held out to calibrate the warning edges, or 0 to turn
    calibration off. Calibration needs at least 20 held-out samples and twice the window before them."""

    false_alarm_rate: float = Field(default=0.05, gt=0, lt=0.5)
    """Share of the held-out samples whose score may reach the warning edge after calibration. The
    default is close to the 4.6 % of normal data beyond 2 sigma, so calibration widens only the edges
    that held-out data passes more often than their 2-sigma meaning promises."""

    @field_validator("window", "min_history")
    @classmethod
    def _valid_duration(cls, value: str) -> str:
        if parse_duration(value) <= 0:
            raise ValueError(f"expected a positive duration, got {value!r}")
        return value

    @field_validator("spectral_bands_hz")
    @classmethod
    def _valid_bands(cls, bands: list[tuple[float, float]]) -> list[tuple[float, float]]:
        for low, high in bands:
            if not 0 <= low < high:
                raise ValueError(f"invalid band [{low}, {high}) Hz: expected 0 <= low < high")
        return bands

    @model_validator(mode="after")
    def _bands_need_sensors(self):
        if self.spectral_bands_hz and not self.vibration_sensors:
            raise ValueError("spectral_bands_hz is set but vibration_sensors is empty: name the vibration sensors")
        return self


@dataclass(frozen=True)
class EquipmentScores(Scores):
    """Results of ``EquipmentDetector.score``.

    The inherited arrays are per panel row (sensor): ``score`` is the sensor's own score,
    ``expected`` its training mean and ``lower``/``upper`` the warning band of its window
    mean (2 sigma times the sensor's calibration factor), in the input's unit.
    """

    entity_score: np.ndarray
    """(entities, time): the score of each entity over all its sensors, NaN where not scored."""

    entities: list[str]
    """Entity ids in the row order of ``entity_score``."""

    row_entity: np.ndarray
    """For each panel row, its entity's row in ``entity_score``."""

    contribution: np.ndarray
    """(rows, time): each sensor's share (0 to 1) of its entity's deviation; shares of an
    entity sum to 1 at each scored time."""


class EquipmentDetector(Detector):
    """Multi-sensor equipment detector: control limits and an autoencoder over window features.

    ``fit`` and ``score`` take a panel whose rows are sensors; ``fit`` also takes each row's
    entity id and sensor name. ``score`` continues the windows and EWMA charts where the
    previous call (or the fit) ended, so consecutive calls score like one long panel.

    FFT features (the dominant frequency and the energy of each band in
    ``spectral_bands_hz``) apply to rows whose sensor is in ``vibration_sensors``. They need raw
    samples: the panel's step is the sampling period, each band must lie below the Nyquist
    frequency ``0.5 / step``, and a window needs at least 8 samples. A Prometheus panel with a
    step of seconds only reaches a fraction of a hertz, so mechanical vibration reaches this
    detector as band amplitudes or RMS series instead, scored as ordinary sensors.

    Parameters
    ----------
    params : EquipmentParams
        ``method`` chooses control limits, the autoencoder or both; ``window`` sets the span of
        each feature; ``ewma_lambda`` the sensitivity of the drift chart; ``min_history`` the
        cold start; ``calibration_share`` and ``false_alarm_rate`` the calibration of the
        warning edges on the newest part of the fit window.
    step : float
        Seconds between samples.
    timezone : str
        Unused; accepted for the common detector interface.
    direction : str
        "both", "up" or "down": which side of each chart counts.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> t = np.arange(600) * 10.0
    >>> panel = rng.normal(0, 1, (2, 600)) + np.array([[50.0], [3.0]])
    >>> detector = EquipmentDetector(EquipmentParams(window="1m", min_history="30m"), step=10.0)
    >>> detector = detector.fit(panel[:, :500], t[:500], entities=["pump1", "pump1"], sensors=["temp", "current"])
    >>> tail = panel[:, 500:].copy()
    >>> tail[1, 60:] += 4.0  # the motor current jumps by 4 standard deviations
    >>> result = detector.score(tail, t[500:])
    >>> bool(np.median(result.entity_score[0, :50]) < 1), bool(result.entity_score[0, 70] >= 2)
    (True, True)
    >>> round(float(result.contribution[1, 70]), 1)
    1.0
    """

    Params = EquipmentParams
    type_name = "equipment"

    def __init__(self, params: EquipmentParams, *, step: float, timezone: str = "UTC", direction: str = "both"):
        super().__init__(params, step=step, timezone=timezone, direction=direction)
        self.window_samples = int(round(parse_duration(params.window) / self.step))
        if self.window_samples < MIN_WINDOW_SAMPLES:
            raise ValueError(
                f"window {params.window!r} holds {self.window_samples} samples at a step of {self.step:g}s: "
                f"expected at least {MIN_WINDOW_SAMPLES}, so set a longer window"
            )
        nyquist = 0.5 / self.step
        for low, high in params.spectral_bands_hz:
            if high > nyquist:
                raise ValueError(
                    f"band [{low:g}, {high:g}) Hz lies above the Nyquist frequency {nyquist:g} Hz of a "
                    f"{self.step:g}s step: FFT features need raw samples at more than {2 * high:g} Hz"
                )
        if params.vibration_sensors and self.window_samples < MIN_FFT_SAMPLES:
            raise ValueError(
                f"window {params.window!r} holds {self.window_samples} samples: FFT features need at least {MIN_FFT_SAMPLES}"
            )
        self.feature_names = list(STAT_FEATURES)
        if params.vibration_sensors:
            bands = [f"band_energy_{low:g}_{high:g}hz" for low, high in params.spectral_bands_hz]
            self.feature_names += ["dominant_frequency_hz", *bands]

    # --- fit -------------------------------------------------------------------------------

    def fit(self, values, timestamps, *, entities, sensors) -> "EquipmentDetector":
        """Learn control limits, EWMA charts and (per ``method``) the autoencoder.

        ``entities[i]`` and ``sensors[i]`` name panel row ``i``; each (entity, sensor) pair
        must be unique. The autoencoder also needs every entity to have the same sensors.
        """
        values, timestamps = check_panel(values, timestamps, step=self.step)
        self._set_rows(entities, sensors, values.shape[0])
        split = self._calibration_split(values.shape[1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            features = self._features(values)
            self._calibrate_limits(values, features, split)
            self._fit_limits(values, features)
            self._fit_ewma(values)
        self.tail_ = self._tail(values)
        self.fitted_until_ = float(timestamps[-1]) if timestamps.size else 0.0
        self.autoencoder_ = None
        if self.params.method != "limits":
            self._fit_autoencoder(features, split)
        return self

    def _calibration_split(self, n_columns: int) -> int | None:
        """Return the first held-out column, or None when calibration is off or the window too short."""
        n_holdout = int(round(self.params.calibration_share * n_columns))
        if n_holdout < MIN_CALIBRATION_SAMPLES or n_columns - n_holdout < 2 * self.window_samples:
            return None
        return n_columns - n_holdout

    def _calibrate_limits(self, values: np.ndarray, features: np.ndarray, split: int | None) -> None:
        """Set the calibration factors of the sensor and entity scores (1 = uncalibrated).

        Limits fitted on the columns before ``split`` score the columns from ``split`` on. A
        score's factor is its ``1 - false_alarm_rate`` quantile there divided by the warning
        edge's deviation, at least 1. The caller's fit on every column overwrites these limits.
        """
        self.sensor_calibration_ = np.ones(values.shape[0])
        self.entity_calibration_ = np.ones(len(self.entities_))
        if split is None:
            return
        self._fit_limits(values[:, :split], features[:, :, :split])
        self._fit_ewma(values[:, :split])
        rows = np.arange(values.shape[0])
        charts, _ = self._charts(features[:, :, split:], values[:, split:], rows)
        sensor_z, entity_z = self._family_z(charts, self.row_entity_)
        self.sensor_calibration_ = self._calibration_factor(sensor_z)
        # NOTE: one excursion of one sensor in the held-out part raises the entity's factor, which
        # then widens the entity's edge for all its sensors (on SKAB it hides two of 16 anomalies).
        self.entity_calibration_ = self._calibration_factor(entity_z)

    def _calibration_factor(self, z: np.ndarray) -> np.ndarray:
        """Return, per row of held-out deviations, how far the warning edge must move out."""
        edge = row_quantiles(z, [1.0 - self.params.false_alarm_rate])[:, 0] / WARNING_Z
        enough = np.sum(~np.isnan(z), axis=1) >= MIN_CALIBRATION_SAMPLES
        return np.where(enough, np.fmax(np.nan_to_num(edge, nan=1.0), 1.0), 1.0)

    def _set_rows(self, entities, sensors, n_rows: int) -> None:
        entities = [str(entity) for entity in entities]
        sensors = [str(sensor) for sensor in sensors]
        if len(entities) != n_rows or len(sensors) != n_rows:
            raise ValueError(
                f"entities and sensors need one name per panel row: got {len(entities)} and {len(sensors)} for {n_rows} rows"
            )
        pairs = list(zip(entities, sensors))
        if len(set(pairs)) != len(pairs):
            duplicate = next(pair for pair in pairs if pairs.count(pair) > 1)
            raise ValueError(f"duplicate panel row for entity {duplicate[0]!r} and sensor {duplicate[1]!r}")
        self.entities_ = sorted(set(entities))
        self.sensors_ = sorted(set(sensors))
        self.row_entity_ = np.array([self.entities_.index(entity) for entity in entities], dtype=np.int64)
        self.row_sensor_ = np.array([self.sensors_.index(sensor) for sensor in sensors], dtype=np.int64)

    def _vibration_rows(self, rows: np.ndarray) -> np.ndarray:
        vibration = [sensor in self.params.vibration_sensors for sensor in self.sensors_]
        return np.asarray(vibration, dtype=bool)[self.row_sensor_[rows]] if vibration else np.zeros(rows.size, bool)

    def _features(self, values: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Compute every window feature: shape (rows, features, columns), NaN where it does not apply."""
        rows = np.arange(values.shape[0]) if rows is None else rows
        statistics = window_statistics(values, self.window_samples)
        if not self.params.vibration_sensors:
            return statistics
        features = np.full((values.shape[0], len(self.feature_names), values.shape[1]), np.nan)
        features[:, : len(STAT_FEATURES)] = statistics
        vibration = self._vibration_rows(rows)
        if vibration.any():
            features[vibration, len(STAT_FEATURES) :] = spectral_window_features(
                values[vibration], self.window_samples, 1.0 / self.step, self.params.spectral_bands_hz
            )
        return features

    def _fit_limits(self, values: np.ndarray, features: np.ndarray) -> None:
        n_rows, n_features, _ = features.shape
        valid_count = np.sum(~np.isnan(values), axis=1)
        complete = np.sum(~np.isnan(features[:, 0]), axis=1)
        self.ready_mask_ = (valid_count * self.step >= parse_duration(self.params.min_history)) & (complete >= 2)

        self.feature_mean_ = np.nanmean(features, axis=2)
        deviation = np.abs(features - self.feature_mean_[:, :, None])
        flat = deviation.reshape(n_rows * n_features, -1)
        tail = row_quantiles(flat, [0.99])[:, 0].reshape(n_rows, n_features)
        spread = np.nan_to_num(np.fmax(np.nanstd(features, axis=2), tail / NORMAL_Q99))
        floor = self._spread_floor(values, self.feature_mean_)
        # The autoencoder standardises with the spread seen in training, and the control limits
        # widen it for autocorrelation.
        self.feature_scale_ = np.fmax(spread, floor)
        self.feature_spread_ = np.fmax(spread * autocorrelation_inflation(features), floor)

    def _spread_floor(self, values: np.ndarray, feature_mean: np.ndarray) -> np.ndarray:
        """Floor of each feature's spread, so constant or quantised training data stays usable."""
        resolution = value_resolution(values)
        level = np.abs(np.nan_to_num(feature_mean[:, STAT_FEATURES.index("mean")]))
        location = np.maximum(resolution, self.params.min_spread_ratio * level)
        floor = np.full(feature_mean.shape, SHAPE_SPREAD_FLOOR)
        for index, name in enumerate(self.feature_names):
            if name in LOCATION_FEATURES:
                floor[:, index] = location
            elif name in SPREAD_FEATURES:
                floor[:, index] = resolution / np.sqrt(self.window_samples)
            elif name in SHAPE_FEATURES:
                floor[:, index] = SHAPE_SPREAD_FLOOR
            elif name == "dominant_frequency_hz":
                floor[:, index] = 1.0 / (self.window_samples * self.step)
        return np.maximum(floor, 1e-9)

    def _fit_ewma(self, values: np.ndarray) -> None:
        """Fit each sensor's EWMA chart: its centre, the spread of the EWMA, the final EWMA."""
        self.value_mean_ = np.nan_to_num(np.nanmean(values, axis=1))
        n_rows = values.shape[0]
        self.ewma_ = self.value_mean_.copy()
        self.ewma_spread_ = np.ones(n_rows)
        lam = self.params.ewma_lambda
        if lam is None:
            return
        location_spread = self.feature_scale_[:, STAT_FEATURES.index("mean")] * np.sqrt(self.window_samples)
        value_spread = np.fmax(np.nan_to_num(np.nanstd(values, axis=1)), location_spread / np.sqrt(self.window_samples))
        # The EWMA of independent samples has a spread of sqrt(lam / (2 - lam)) times theirs.
        # Autocorrelated sensors wander more, so the spread seen in training is used when larger.
        theoretical = value_spread * np.sqrt(lam / (2.0 - lam))
        path = self._run_ewma(values, self.value_mean_.copy())
        burn_in = min(int(np.ceil(1.0 / lam)), values.shape[1] // 2)
        observed = np.nan_to_num(np.nanstd(path[:, burn_in:] - self.value_mean_[:, None], axis=1))
        # The centre is itself estimated from the training data: the inflation for the EWMA's
        # own autocorrelation covers both its uncertainty and the spread it hides.
        inflation = autocorrelation_inflation(path[:, None, burn_in:])[:, 0]
        self.ewma_spread_ = np.maximum(np.fmax(theoretical, observed) * inflation, 1e-9)
        self.ewma_ = path[:, -1] if values.shape[1] else self.ewma_

    def _run_ewma(self, values: np.ndarray, start: np.ndarray) -> np.ndarray:
        """Return the EWMA after each column; a missing value keeps the previous EWMA."""
        lam = self.params.ewma_lambda
        path = np.empty_like(values)
        ewma = start
        for column in range(values.shape[1]):
            observed = values[:, column]
            ewma = np.where(np.isnan(observed), ewma, (1.0 - lam) * ewma + lam * observed)
            path[:, column] = ewma
        return path

    def _tail(self, values: np.ndarray) -> np.ndarray:
        """Return the newest ``window - 1`` columns, padded with NaN on the left."""
        width = self.window_samples - 1
        tail = np.full((values.shape[0], width), np.nan)
        kept = values[:, -width:] if values.shape[1] else values
        tail[:, width - kept.shape[1] :] = kept
        return tail

    # --- autoencoder -----------------------------------------------------------------------

    def _entity_rows(self) -> np.ndarray:
        """Return (entities, sensors) panel row numbers; raises ValueError when a sensor is missing."""
        table = np.full((len(self.entities_), len(self.sensors_)), -1, dtype=np.int64)
        table[self.row_entity_, self.row_sensor_] = np.arange(self.row_entity_.size)
        missing = np.argwhere(table < 0)
        if missing.size:
            entity, sensor = missing[0]
            raise ValueError(
                f"the autoencoder needs the same sensors for every entity: entity {self.entities_[entity]!r} "
                f"has no sensor {self.sensors_[sensor]!r}"
            )
        return table

    def _input_columns(self) -> np.ndarray:
        """Return the (sensor, feature) pairs that apply, as a boolean (sensors, features) mask."""
        mask = np.ones((len(self.sensors_), len(self.feature_names)), dtype=bool)
        for index, sensor in enumerate(self.sensors_):
            if sensor not in self.params.vibration_sensors:
                mask[index, len(STAT_FEATURES) :] = False
        return mask

    def _standardised_inputs(self, features: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Arrange standardised features as (entities, columns, inputs), NaN where missing.

        ``features`` belongs to panel rows ``rows`` (fitted row numbers); sensors of an
        entity absent from the panel stay NaN.
        """
        table = self.entity_rows_
        n_columns = features.shape[2]
        standard = (features - self.feature_mean_[rows][:, :, None]) / self.feature_scale_[rows][:, :, None]
        by_fitted_row = np.full((self.row_entity_.size, len(self.feature_names), n_columns), np.nan)
        by_fitted_row[rows] = standard
        arranged = by_fitted_row[table]  # (entities, sensors, features, columns)
        arranged = arranged[:, self.input_mask_]  # (entities, inputs, columns)
        return np.moveaxis(arranged, 2, 1)

    def _input_sensor(self) -> np.ndarray:
        """Return the sensor index of each autoencoder input."""
        sensor_of = np.repeat(np.arange(len(self.sensors_))[:, None], len(self.feature_names), axis=1)
        return sensor_of[self.input_mask_]

    def _fit_autoencoder(self, features: np.ndarray, split: int | None) -> None:
        """Train the autoencoder on the standardised features and set its warning edges.

        With calibration (``split`` not None) it trains on the columns before ``split`` only,
        and the columns from ``split`` on can raise the edges. The inputs of both are
        standardised with the limits of the whole window.
        """
        self.entity_rows_ = self._entity_rows()
        self.input_mask_ = self._input_columns()
        inputs = self._standardised_inputs(features, np.arange(self.row_entity_.size))
        complete = ~np.isnan(inputs).any(axis=2)
        ready_entity = np.zeros(len(self.entities_), dtype=bool)
        np.logical_or.at(ready_entity, self.row_entity_, self.ready_mask_)
        complete &= ready_entity[:, None]
        end = inputs.shape[1] if split is None else split
        training = complete.copy()
        training[:, end:] = False
        samples = inputs[training]
        if samples.shape[0] < MIN_AUTOENCODER_SAMPLES:
            raise ValueError(
                f"too little complete training data for the autoencoder: {samples.shape[0]} feature vectors, "
                f"expected at least {MIN_AUTOENCODER_SAMPLES}; fit on a longer window of history"
            )
        params = self.params
        self.autoencoder_ = _autoencoder.train_autoencoder(
            samples.astype(np.float32), epochs=params.autoencoder_epochs, batch_size=params.autoencoder_batch_size, seed=params.seed
        )

        # Warning edges per entity and per (entity, sensor).
        squared = np.full(inputs.shape, np.nan)
        squared[complete] = (_autoencoder.reconstruct(self.autoencoder_, inputs[complete]) - inputs[complete]) ** 2
        entity_rms, sensor_rms = self._error_rms(squared)
        self.ae_entity_edge_ = self._error_edge(entity_rms, end)
        by_sensor = self._error_edge(sensor_rms.reshape(-1, sensor_rms.shape[2]), end)
        by_sensor = by_sensor.reshape(len(self.entities_), len(self.sensors_))
        self.ae_sensor_edge_ = by_sensor[self.row_entity_, self.row_sensor_]

    def _error_edge(self, rms: np.ndarray, split: int) -> np.ndarray:
        """Return the warning edge of each row of RMS errors (rows, columns).

        The edge is the ``autoencoder_quantile`` of the columns before ``split``, raised to the
        ``1 - false_alarm_rate`` quantile of the later columns where those hold enough errors.
        """
        edge = row_quantiles(rms[:, :split], [self.params.autoencoder_quantile])[:, 0]
        held_out = rms[:, split:]
        if held_out.shape[1]:
            calibrated = row_quantiles(held_out, [1.0 - self.params.false_alarm_rate])[:, 0]
            enough = np.sum(~np.isnan(held_out), axis=1) >= MIN_CALIBRATION_SAMPLES
            edge = np.where(enough, np.fmax(edge, calibrated), edge)
        return np.maximum(np.nan_to_num(edge, nan=1.0), 1e-6)

    def _error_rms(self, squared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Turn squared errors (entities, columns, inputs) into RMS per entity and per sensor.

        Returns (entities, columns) and (entities, sensors, columns).
        """
        entity_rms = np.sqrt(np.mean(squared, axis=2))
        sensor_of = self._input_sensor()
        sensor_rms = np.stack(
            [np.sqrt(np.mean(squared[:, :, sensor_of == sensor], axis=2)) for sensor in range(len(self.sensors_))], axis=1
        )
        return entity_rms, sensor_rms

    # --- score -----------------------------------------------------------------------------

    @property
    def ready_(self) -> np.ndarray:
        return self.ready_mask_

    def score(self, values, timestamps, rows=None) -> EquipmentScores:
        """Score each column of each sensor and entity; ``rows[i]`` is the fitted row of panel row ``i``."""
        values, timestamps = check_panel(values, timestamps, step=self.step)
        rows = np.arange(values.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
        if rows.shape != (values.shape[0],) or (rows.size and (rows.min() < 0 or rows.max() >= self.row_entity_.size)):
            raise ValueError(f"rows must give a fitted row (0 to {self.row_entity_.size - 1}) for each of {values.shape[0]} panel rows")
        if self.params.method != "limits" and self.autoencoder_ is None:
            raise StateError("the autoencoder is not loaded: pass model_path to set_state, or refit")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return self._score(values, timestamps, rows)

    def _score(self, values: np.ndarray, timestamps: np.ndarray, rows: np.ndarray) -> EquipmentScores:
        n_columns = values.shape[1]
        extended = np.concatenate([self.tail_[rows], values], axis=1)
        features = self._features(extended, rows)[:, :, -n_columns:] if n_columns else np.empty((rows.size, len(self.feature_names), 0))

        charts, ewma_path = self._charts(features, values, rows)
        if ewma_path is not None and n_columns:
            self.ewma_[rows] = ewma_path[:, -1]
        row_entity = self.row_entity_[rows]
        n_entities = len(self.entities_)

        sensor_z, entity_z = self._family_z(charts, row_entity)
        sensor_limits = chart_score(sensor_z / self.sensor_calibration_[rows][:, None])
        entity_limits = chart_score(entity_z / self.entity_calibration_[:, None])
        limits_energy = np.nansum(charts**2, axis=1)

        if self.params.method == "limits":
            sensor_score, entity_score, energy = sensor_limits, entity_limits, limits_energy
        else:
            sensor_ae, entity_ae, ae_energy = self._autoencoder_scores(features, rows, n_columns)
            if self.params.method == "autoencoder":
                sensor_score, entity_score, energy = sensor_ae, entity_ae, ae_energy
            else:
                sensor_score = np.fmax(sensor_limits, sensor_ae)
                entity_score = np.fmax(entity_limits, entity_ae)
                # Shares follow the method that gave the entity's score at each time.
                autoencoder_wins = (np.nan_to_num(entity_ae, nan=-1.0) > np.nan_to_num(entity_limits, nan=-1.0))[row_entity]
                energy = np.where(autoencoder_wins, ae_energy, limits_energy)

        contribution = self._shares(energy, row_entity, n_entities)
        self._mask_not_ready(rows, row_entity, sensor_score, entity_score, contribution)

        self.tail_[rows] = extended[:, extended.shape[1] - self.tail_.shape[1] :]
        if timestamps.size:
            self.fitted_until_ = max(self.fitted_until_, float(timestamps[-1]))
        mean_index = STAT_FEATURES.index("mean")
        centre = np.repeat(self.feature_mean_[rows, mean_index][:, None], n_columns, axis=1)
        half_width = WARNING_Z * self.feature_spread_[rows, mean_index][:, None] * self.sensor_calibration_[rows][:, None]
        return EquipmentScores(
            score=np.minimum(sensor_score, MAX_SCORE),
            expected=centre,
            lower=centre - half_width,
            upper=centre + half_width,
            entity_score=np.minimum(entity_score, MAX_SCORE),
            entities=list(self.entities_),
            row_entity=row_entity,
            contribution=contribution,
        )

    def _charts(self, features: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Return the unsigned deviations (rows, charts, columns) and the EWMA path (None without EWMA).

        There is one chart per feature, plus the EWMA chart of each sensor. The EWMA continues
        from ``self.ewma_``, and the caller decides whether to keep the path's end.
        """
        z = self.directional((features - self.feature_mean_[rows][:, :, None]) / self.feature_spread_[rows][:, :, None])
        if self.params.ewma_lambda is None:
            return z, None
        path = self._run_ewma(values, self.ewma_[rows].copy())
        drift = self.directional((path - self.value_mean_[rows][:, None]) / self.ewma_spread_[rows][:, None])
        return np.concatenate([z, drift[:, None, :]], axis=1), path

    def _family_z(self, charts: np.ndarray, row_entity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the largest chart deviation of each sensor (rows, columns) and each entity
        (entities, columns), Sidak-corrected for the number of charts when configured."""
        n_columns = charts.shape[2]
        sensor_max = np.nanmax(charts, axis=1)
        sensor_count = np.sum(~np.isnan(charts), axis=1)
        entity_max = np.full((len(self.entities_), n_columns), -np.inf)
        np.fmax.at(entity_max, row_entity, np.nan_to_num(sensor_max, nan=-np.inf))
        entity_count = np.zeros((len(self.entities_), n_columns))
        np.add.at(entity_count, row_entity, sensor_count)
        entity_max = np.where(np.isfinite(entity_max), entity_max, np.nan)
        return self._family_correct(sensor_max, sensor_count), self._family_correct(entity_max, entity_count)

    def _family_correct(self, z_max: np.ndarray, count: np.ndarray) -> np.ndarray:
        if not self.params.family_correction:
            return z_max
        return family_z(z_max, count, two_sided=self.direction == "both")

    def _autoencoder_scores(self, features, rows, n_columns):
        """Return (sensor scores, entity scores, squared error per sensor) of the autoencoder."""
        inputs = self._standardised_inputs(features, rows)
        present = ~np.isnan(inputs).all(axis=2)
        filled = np.nan_to_num(inputs.reshape(-1, inputs.shape[2]))
        output = _autoencoder.reconstruct(self.autoencoder_, filled.astype(np.float32)).reshape(inputs.shape)
        squared = np.where(np.isnan(inputs), np.nan, (output - filled.reshape(inputs.shape)) ** 2)
        entity_rms, sensor_rms = self._error_rms(squared)
        entity_rms = np.where(present, entity_rms, np.nan)

        entity_score = error_ratio_score(entity_rms / self.ae_entity_edge_[:, None])
        row_entity = self.row_entity_[rows]
        row_rms = sensor_rms[row_entity, self.row_sensor_[rows]]
        sensor_score = error_ratio_score(row_rms / self.ae_sensor_edge_[rows][:, None])
        return sensor_score, entity_score, row_rms**2

    @staticmethod
    def _shares(energy: np.ndarray, row_entity: np.ndarray, n_entities: int) -> np.ndarray:
        total = np.zeros((n_entities, energy.shape[1]))
        np.add.at(total, row_entity, np.nan_to_num(energy))
        entity_total = total[row_entity]
        return np.where(entity_total > 0, np.nan_to_num(energy) / np.where(entity_total > 0, entity_total, 1.0), np.nan)

    def _mask_not_ready(self, rows, row_entity, sensor_score, entity_score, contribution) -> None:
        not_ready = ~self.ready_mask_[rows]
        sensor_score[not_ready] = np.nan
        contribution[not_ready] = np.nan
        entity_ready = np.zeros(len(self.entities_), dtype=bool)
        np.logical_or.at(entity_ready, row_entity, ~not_ready)
        entity_score[~entity_ready] = np.nan

    # --- state -----------------------------------------------------------------------------

    def get_state(self, model_path: str | Path | None = None) -> tuple[dict[str, np.ndarray], dict]:
        """Return the fitted state as numeric arrays and a JSON-serialisable dict.

        With ``method`` autoencoder or both, the Keras model is written to ``model_path``
        (a ``.keras`` file the caller chooses); the state does not record the path.
        """
        arrays = {
            "row_entity": self.row_entity_,
            "row_sensor": self.row_sensor_,
            "ready": self.ready_mask_,
            "feature_mean": self.feature_mean_,
            "feature_spread": self.feature_spread_,
            "value_mean": self.value_mean_,
            "ewma": self.ewma_,
            "ewma_spread": self.ewma_spread_,
            "tail": self.tail_,
            "sensor_calibration": self.sensor_calibration_,
            "entity_calibration": self.entity_calibration_,
        }
        if self.params.method != "limits":
            if model_path is None:
                raise ValueError(f"method {self.params.method!r} has a Keras model: pass model_path to save it")
            _autoencoder.save_model(self.autoencoder_, model_path)
            arrays["feature_scale"] = self.feature_scale_
            arrays["ae_entity_edge"] = self.ae_entity_edge_
            arrays["ae_sensor_edge"] = self.ae_sensor_edge_
        meta = {
            "format_version": STATE_FORMAT_VERSION,
            "type": self.type_name,
            "method": self.params.method,
            "entities": self.entities_,
            "sensors": self.sensors_,
            "feature_names": self.feature_names,
            "window_samples": self.window_samples,
            "calibration_share": self.params.calibration_share,
            "false_alarm_rate": self.params.false_alarm_rate,
            "fitted_until": self.fitted_until_,
        }
        return arrays, meta

    def set_state(self, arrays, meta, model_path: str | Path | None = None) -> "EquipmentDetector":
        """Restore state saved by ``get_state``; raises StateError when it does not fit this detector."""
        expected_meta = {
            "format_version": STATE_FORMAT_VERSION,
            "type": self.type_name,
            "method": self.params.method,
            "feature_names": self.feature_names,
            "window_samples": self.window_samples,
            "calibration_share": self.params.calibration_share,
            "false_alarm_rate": self.params.false_alarm_rate,
        }
        for key, value in expected_meta.items():
            if meta.get(key) != value:
                raise StateError(f"state has {key} {meta.get(key)!r}, expected {value!r}; the detector will be refitted")
        try:
            # Copies, because scoring updates the tail and the EWMA in place.
            restored = {name: np.array(arrays[name], dtype=np.float64) for name in arrays}
            self.entities_ = [str(entity) for entity in meta["entities"]]
            self.sensors_ = [str(sensor) for sensor in meta["sensors"]]
            fitted_until = float(meta["fitted_until"])
            row_entity = restored["row_entity"].astype(np.int64)
            row_sensor = restored["row_sensor"].astype(np.int64)
        except (KeyError, TypeError, ValueError) as error:
            raise StateError(f"state is incomplete or malformed: {error}") from None
        n_rows, n_features = row_entity.size, len(self.feature_names)
        shapes = {
            "row_sensor": (n_rows,),
            "ready": (n_rows,),
            "feature_mean": (n_rows, n_features),
            "feature_spread": (n_rows, n_features),
            "value_mean": (n_rows,),
            "ewma": (n_rows,),
            "ewma_spread": (n_rows,),
            "tail": (n_rows, self.window_samples - 1),
            "sensor_calibration": (n_rows,),
            "entity_calibration": (len(self.entities_),),
        }
        if self.params.method != "limits":
            shapes["feature_scale"] = (n_rows, n_features)
            shapes["ae_entity_edge"] = (len(self.entities_),)
            shapes["ae_sensor_edge"] = (n_rows,)
        for name, shape in shapes.items():
            if name not in restored or restored[name].shape != shape:
                actual = restored[name].shape if name in restored else "missing"
                raise StateError(f"state array {name!r} has shape {actual}, expected {shape}")
        in_range = (row_entity >= 0).all() and (row_entity < len(self.entities_)).all()
        in_range = in_range and (row_sensor >= 0).all() and (row_sensor < len(self.sensors_)).all()
        if not in_range or not np.all(restored["feature_spread"] > 0) or not np.all(restored["ewma_spread"] > 0):
            raise StateError("invalid state: row indices out of range or non-positive spreads; the detector will be refitted")
        calibration = np.concatenate([restored["sensor_calibration"], restored["entity_calibration"]])
        if not np.all(np.isfinite(calibration) & (calibration >= 1.0)):
            raise StateError("invalid state: calibration factors must be finite and at least 1, so the detector will be refitted")
        if "feature_scale" in shapes and not np.all(restored["feature_scale"] > 0):
            raise StateError("invalid state: non-positive feature scales, so the detector will be refitted")

        self.row_entity_, self.row_sensor_ = row_entity, row_sensor
        self.ready_mask_ = restored["ready"].astype(bool)
        self.feature_mean_, self.feature_spread_ = restored["feature_mean"], restored["feature_spread"]
        self.value_mean_, self.ewma_, self.ewma_spread_ = restored["value_mean"], restored["ewma"], restored["ewma_spread"]
        self.tail_ = restored["tail"]
        self.sensor_calibration_ = restored["sensor_calibration"]
        self.entity_calibration_ = restored["entity_calibration"]
        self.fitted_until_ = fitted_until
        self.autoencoder_ = None
        if self.params.method != "limits":
            if model_path is None:
                raise StateError(f"method {self.params.method!r} needs its Keras model: pass model_path")
            self.entity_rows_ = self._entity_rows()
            self.input_mask_ = self._input_columns()
            self.feature_scale_ = restored["feature_scale"]
            self.ae_entity_edge_, self.ae_sensor_edge_ = restored["ae_entity_edge"], restored["ae_sensor_edge"]
            self.autoencoder_ = _autoencoder.load_model(model_path)
        return self


def family_z(z_max: np.ndarray, count: np.ndarray, *, two_sided: bool = True) -> np.ndarray:
    """Turn the largest of ``count`` normal deviations into one deviation with the same tail probability.

    With ``p`` the tail probability of ``z_max``, the probability that any of ``count``
    independent charts goes that far is ``1 - (1 - p) ** count`` (Sidak); the result is the
    deviation of a single chart with that probability. NaN where ``count`` is 0.

    >>> float(np.round(family_z(np.array(3.0), np.array(1)), 6))
    3.0
    >>> bool(family_z(np.array(3.0), np.array(50)) < 2)
    True
    """
    z = np.clip(np.asarray(z_max, dtype=np.float64), 0.0, None)
    count = np.asarray(count, dtype=np.float64)
    exact = np.minimum(z, MAX_EXACT_Z)
    sides = 2.0 if two_sided else 1.0
    tail = np.minimum(sides * special.ndtr(-exact), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        family = -np.expm1(count * np.log1p(-tail))
        corrected = -special.ndtri(np.clip(family, 1e-300, 1.0) / sides)
    corrected = np.maximum(corrected, 0.0) + (z - exact)
    return np.where((count > 0) & ~np.isnan(z), corrected, np.nan)


def autocorrelation_inflation(series: np.ndarray) -> np.ndarray:
    """Return the factor by which autocorrelation widens the spread of each series, at least 1.

    ``series`` has shape (rows, features, columns), NaN where missing. With ``r`` the lag-1
    autocorrelation (negative values count as 0) and ``n`` the number of values, the effective
    number of independent values is ``n_eff = n (1 - r) / (1 + r)``, the AR(1) approximation.
    The factor is ``sqrt((1 + 1 / n_eff) / (1 - 1 / n_eff))``: the sample variance around the
    sample mean is short by about ``1 / n_eff`` of the variance, and a new value varies around that
    mean by ``1 + 1 / n_eff`` times the variance. It is capped at MAX_SPREAD_INFLATION, which
    it reaches for ``n_eff`` of about 1.02 or less. Series with fewer than two values get 1.

    >>> rng = np.random.default_rng(0)
    >>> noise = rng.normal(size=(1, 1, 1000))
    >>> float(np.round(autocorrelation_inflation(noise)[0, 0], 2))
    1.0
    >>> walk = np.cumsum(noise, axis=2)
    >>> float(autocorrelation_inflation(walk)[0, 0]) > 3
    True
    """
    series = np.asarray(series, dtype=np.float64)
    count = np.sum(~np.isnan(series), axis=2)
    mean = np.nansum(series, axis=2, keepdims=True) / np.maximum(count, 1)[:, :, None]
    centred = series - mean
    later, earlier = centred[:, :, 1:], centred[:, :, :-1]
    pairs = ~np.isnan(later) & ~np.isnan(earlier)
    product = np.sum(np.where(pairs, later * earlier, 0.0), axis=2)
    energy = np.sum(np.where(pairs, earlier**2, 0.0), axis=2)
    correlation = np.clip(np.where(energy > 0, product / np.where(energy > 0, energy, 1.0), 0.0), 0.0, 1.0)
    effective = count * (1.0 - correlation) / (1.0 + correlation)
    inverse = 1.0 / np.maximum(effective, 1.0)
    factor = np.sqrt((1.0 + inverse) / np.maximum(1.0 - inverse, 1e-12))
    return np.where(count >= 2, np.minimum(factor, MAX_SPREAD_INFLATION), 1.0)


def error_ratio_score(ratio: np.ndarray) -> np.ndarray:
    """Map an autoencoder error ratio (1 = warning edge) to the score scale: critical at 1.5."""
    ratio = np.asarray(ratio, dtype=np.float64)
    return np.where(ratio <= 1.0, ratio, 1.0 + 2.0 * (ratio - 1.0))
