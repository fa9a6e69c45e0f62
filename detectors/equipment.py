"""Equipment: multivariate control limits and an optional autoencoder over window features.

A panel row is one sensor of one piece of equipment (the entity). Each row is summarised by
statistics over a sliding window (mean, std, min, max, range, skewness, kurtosis, plus a
dominant frequency and band energies for vibration sensors sampled fast enough). Fitting on
normal operation learns a control chart per feature, an EWMA chart per sensor for slow drift
and, when configured, a dense autoencoder over an entity's standardised features.

Score scale, shared with every detector type (1 = warning edge, 2 = critical edge):

* Control charts: a deviation of ``z`` standard deviations scores ``z / 2`` up to ``z = 2``
  and ``1 + (z - 2)`` beyond, so 2 sigma is 1 and 3 sigma is 2. With ``family_correction``,
  the largest ``z`` of an entity's (or a sensor's) ``m`` charts is first turned into the
  ``z`` of one chart with the same false-alarm probability (Sidak). An entity with 60 charts
  is then not at its warning edge whenever one of them passes 2 sigma.
* Autoencoder: the root mean square reconstruction error, divided by its
  ``autoencoder_quantile`` over the training data, is the error ratio ``r``. The score is ``r``
  up to 1 and ``1 + 2 (r - 1)`` beyond: ``r`` is read as ``z / 2``, so the critical edge sits
  at 1.5 times the warning error, as 3 sigma is 1.5 times 2 sigma on a control chart.
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
    """Quantile of the training reconstruction error that is the autoencoder's warning edge."""

    autoencoder_epochs: int = Field(default=200, ge=1, le=10000)
    """Most training epochs; training stops earlier when the validation loss stalls for 10."""

    autoencoder_batch_size: int = Field(default=32, ge=1)
    """Samples per gradient step of the autoencoder."""

    seed: int = 0
    """Seed of the autoencoder's weight initialisation and shuffling."""

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
    mean (2 sigma), in the input's unit.
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
        cold start.
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            features = self._features(values)
            self._fit_limits(values, features)
            self._fit_ewma(values)
        self.tail_ = self._tail(values)
        self.fitted_until_ = float(timestamps[-1]) if timestamps.size else 0.0
        self.autoencoder_ = None
        if self.params.method != "limits":
            self._fit_autoencoder(features)
        return self

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
        spread = np.fmax(np.nanstd(features, axis=2), tail / NORMAL_Q99)
        self.feature_spread_ = np.fmax(np.nan_to_num(spread), self._spread_floor(values, self.feature_mean_))

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
        location_spread = self.feature_spread_[:, STAT_FEATURES.index("mean")] * np.sqrt(self.window_samples)
        value_spread = np.fmax(np.nan_to_num(np.nanstd(values, axis=1)), location_spread / np.sqrt(self.window_samples))
        # The EWMA of independent samples has a spread of sqrt(lam / (2 - lam)) times theirs.
        # Autocorrelated sensors wander more, so the spread seen in training is used when larger.
        theoretical = value_spread * np.sqrt(lam / (2.0 - lam))
        path = self._run_ewma(values, self.value_mean_.copy())
        burn_in = min(int(np.ceil(1.0 / lam)), values.shape[1] // 2)
        observed = np.nan_to_num(np.nanstd(path[:, burn_in:] - self.value_mean_[:, None], axis=1))
        # The centre is itself estimated from the training data, with a variance of the
        # samples' variance over their count, inflated as much as autocorrelation inflated
        # the EWMA's spread.
        inflation = np.fmax(observed / np.maximum(theoretical, 1e-300), 1.0) ** 2
        count = np.maximum(np.sum(~np.isnan(values), axis=1), 1)
        centre_variance = value_spread**2 / count * inflation
        self.ewma_spread_ = np.sqrt(np.fmax(theoretical, observed) ** 2 + centre_variance)
        self.ewma_spread_ = np.maximum(self.ewma_spread_, 1e-9)
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
        standard = (features - self.feature_mean_[rows][:, :, None]) / self.feature_spread_[rows][:, :, None]
        by_fitted_row = np.full((self.row_entity_.size, len(self.feature_names), n_columns), np.nan)
        by_fitted_row[rows] = standard
        arranged = by_fitted_row[table]  # (entities, sensors, features, columns)
        arranged = arranged[:, self.input_mask_]  # (entities, inputs, columns)
        return np.moveaxis(arranged, 2, 1)

    def _input_sensor(self) -> np.ndarray:
        """Return the sensor index of each autoencoder input."""
        sensor_of = np.repeat(np.arange(len(self.sensors_))[:, None], len(self.feature_names), axis=1)
        return sensor_of[self.input_mask_]

    def _fit_autoencoder(self, features: np.ndarray) -> None:
        self.entity_rows_ = self._entity_rows()
        self.input_mask_ = self._input_columns()
        inputs = self._standardised_inputs(features, np.arange(self.row_entity_.size))
        complete = ~np.isnan(inputs).any(axis=2)
        ready_entity = np.zeros(len(self.entities_), dtype=bool)
        np.logical_or.at(ready_entity, self.row_entity_, self.ready_mask_)
        complete &= ready_entity[:, None]
        samples = inputs[complete]
        if samples.shape[0] < MIN_AUTOENCODER_SAMPLES:
            raise ValueError(
                f"too little complete training data for the autoencoder: {samples.shape[0]} feature vectors, "
                f"expected at least {MIN_AUTOENCODER_SAMPLES}; fit on a longer window of history"
            )
        params = self.params
        self.autoencoder_ = _autoencoder.train_autoencoder(
            samples.astype(np.float32), epochs=params.autoencoder_epochs, batch_size=params.autoencoder_batch_size, seed=params.seed
        )

        # Warning edges: a quantile of the training error per entity and per (entity, sensor).
        squared = np.full(inputs.shape, np.nan)
        squared[complete] = (_autoencoder.reconstruct(self.autoencoder_, samples) - samples) ** 2
        entity_rms, sensor_rms = self._error_rms(squared)
        quantile = params.autoencoder_quantile
        self.ae_entity_edge_ = np.nan_to_num(row_quantiles(entity_rms, [quantile])[:, 0], nan=1.0)
        by_sensor = row_quantiles(sensor_rms.reshape(-1, sensor_rms.shape[2]), [quantile])[:, 0]
        by_sensor = by_sensor.reshape(len(self.entities_), len(self.sensors_))
        self.ae_sensor_edge_ = np.nan_to_num(by_sensor, nan=1.0)[self.row_entity_, self.row_sensor_]
        self.ae_entity_edge_ = np.maximum(self.ae_entity_edge_, 1e-6)
        self.ae_sensor_edge_ = np.maximum(self.ae_sensor_edge_, 1e-6)

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

        # Control charts: one per feature, plus the EWMA chart of each sensor.
        z = self.directional((features - self.feature_mean_[rows][:, :, None]) / self.feature_spread_[rows][:, :, None])
        charts = [z]
        if self.params.ewma_lambda is not None:
            path = self._run_ewma(values, self.ewma_[rows].copy())
            if n_columns:
                self.ewma_[rows] = path[:, -1]
            drift = self.directional((path - self.value_mean_[rows][:, None]) / self.ewma_spread_[rows][:, None])
            charts.append(drift[:, None, :])
        charts = np.concatenate(charts, axis=1)
        row_entity = self.row_entity_[rows]
        n_entities = len(self.entities_)

        sensor_limits = self._family_score(np.nanmax(charts, axis=1), np.sum(~np.isnan(charts), axis=1))
        limits_energy = np.nansum(charts**2, axis=1)
        entity_max = np.full((n_entities, n_columns), -np.inf)
        np.fmax.at(entity_max, row_entity, np.nan_to_num(np.nanmax(charts, axis=1), nan=-np.inf))
        entity_count = np.zeros((n_entities, n_columns))
        np.add.at(entity_count, row_entity, np.sum(~np.isnan(charts), axis=1))
        entity_limits = self._family_score(np.where(np.isfinite(entity_max), entity_max, np.nan), entity_count)

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
        half_width = 2.0 * self.feature_spread_[rows, mean_index][:, None]
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

    def _family_score(self, z_max: np.ndarray, count: np.ndarray) -> np.ndarray:
        """Map the largest of ``count`` chart deviations to the score scale, Sidak-corrected."""
        if not self.params.family_correction:
            return chart_score(z_max)
        return chart_score(family_z(z_max, count, two_sided=self.direction == "both"))

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
        }
        if self.params.method != "limits":
            if model_path is None:
                raise ValueError(f"method {self.params.method!r} has a Keras model: pass model_path to save it")
            _autoencoder.save_model(self.autoencoder_, model_path)
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
        }
        if self.params.method != "limits":
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

        self.row_entity_, self.row_sensor_ = row_entity, row_sensor
        self.ready_mask_ = restored["ready"].astype(bool)
        self.feature_mean_, self.feature_spread_ = restored["feature_mean"], restored["feature_spread"]
        self.value_mean_, self.ewma_, self.ewma_spread_ = restored["value_mean"], restored["ewma"], restored["ewma_spread"]
        self.tail_ = restored["tail"]
        self.fitted_until_ = fitted_until
        self.autoencoder_ = None
        if self.params.method != "limits":
            if model_path is None:
                raise StateError(f"method {self.params.method!r} needs its Keras model: pass model_path")
            self.entity_rows_ = self._entity_rows()
            self.input_mask_ = self._input_columns()
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


def error_ratio_score(ratio: np.ndarray) -> np.ndarray:
    """Map an autoencoder error ratio (1 = warning edge) to the score scale: critical at 1.5."""
    ratio = np.asarray(ratio, dtype=np.float64)
    return np.where(ratio <= 1.0, ratio, 1.0 + 2.0 * (ratio - 1.0))
