"""Vibration spectra: FFT window features and fault signatures at orders of the shaft speed.

A fault of a rotating machine raises the vibration amplitude at a typical multiple (order) of
the shaft's rotation frequency. Imbalance shows at 1x and misalignment at 2x. A damaged bearing
outer race shows at its ball pass frequency BPFO, and an inner race at BPFI. BPFO and BPFI depend on the
bearing's geometry, so they are configured per bearing as orders of the shaft speed.
"""

from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import BaseModel, ConfigDict, Field, model_validator

from detectors._features import chart_score

# Minimum samples in a window for FFT features, because fewer leave too few bins to place a peak.
MIN_FFT_SAMPLES = 8

# Log-amplitude floor added before taking logarithms of spectra, relative to the baseline median.
LOG_FLOOR_RATIO = 1e-6


def hann_amplitude_spectrum(frames: np.ndarray, sample_rate_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (one-sided amplitude spectrum along the last axis, bin frequencies in Hz).

    Each frame loses its mean and gets a Hann window. Amplitudes are scaled so that a sine of
    amplitude A that falls on a bin shows as A.
    """
    frames = np.asarray(frames, dtype=np.float64)
    size = frames.shape[-1]
    taper = np.hanning(size)
    centred = frames - frames.mean(axis=-1, keepdims=True)
    spectrum = np.abs(np.fft.rfft(centred * taper, axis=-1)) * (2.0 / taper.sum())
    return spectrum, np.fft.rfftfreq(size, d=1.0 / sample_rate_hz)


def spectral_window_features(
    values: np.ndarray, window: int, sample_rate_hz: float, bands_hz: list[tuple[float, float]]
) -> np.ndarray:
    """Compute the dominant frequency and band energies over sliding windows of raw samples.

    Returns shape (rows, 1 + len(bands_hz), columns): the frequency in Hz of the largest
    non-DC bin, then log10 of each band's energy (sum of squared amplitudes of the bins in
    ``[low, high)``). Columns before the first complete window, and windows with a missing
    sample, are NaN. Each band must lie below the Nyquist frequency, half the sample rate.
    """
    values = np.asarray(values, dtype=np.float64)
    n_rows, n_columns = values.shape
    features = np.full((n_rows, 1 + len(bands_hz), n_columns), np.nan)
    if n_columns < window or n_rows == 0:
        return features
    # NOTE: this keeps a spectrum for every column of every vibration row at once, so memory
    # grows with rows x columns x window / 2; spectra of long raw panels should be fed in parts.
    frames = sliding_window_view(values, window, axis=1)
    spectrum, frequencies = hann_amplitude_spectrum(np.nan_to_num(frames), sample_rate_hz)
    complete = ~np.isnan(frames).any(axis=-1)
    last = slice(window - 1, None)

    dominant = frequencies[1:][np.argmax(spectrum[..., 1:], axis=-1)]
    features[:, 0, last] = np.where(complete, dominant, np.nan)
    power = spectrum**2
    for index, (low, high) in enumerate(bands_hz, start=1):
        in_band = (frequencies >= low) & (frequencies < high)
        energy = power[..., in_band].sum(axis=-1)
        with np.errstate(divide="ignore"):
            features[:, index, last] = np.where(complete, np.log10(energy + 1e-30), np.nan)
    return features


class Bearing(BaseModel):
    """Defect frequencies of one bearing as orders of the shaft speed (multiples of 1x)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    bpfo: float = Field(gt=0)
    """Ball pass frequency of the outer race divided by the shaft frequency, such as 3.58."""
    bpfi: float = Field(gt=0)
    """Ball pass frequency of the inner race divided by the shaft frequency, such as 5.42."""


class FaultSignatureParams(BaseModel):
    """Settings of the vibration fault signatures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bearings: list[Bearing] = []
    """Bearings whose outer and inner race orders are scored, one pair of faults per bearing."""

    order_tolerance: float = Field(default=0.03, gt=0, lt=0.5)
    """Relative width of the search around each order, for slip and speed error: 0.03 = ±3 %."""

    min_log_spread: float = Field(default=0.15, gt=0)
    """Floor of the baseline spread of the natural log of each order's amplitude. With 0.15
    the warning edge (2 spreads) is at least 1.35 times the baseline amplitude and the
    critical edge (3 spreads) at least 1.57 times."""

    running_speed_rpm: float | None = Field(default=None, gt=0)
    """Constant shaft speed used when no speed series is given."""

    speed_unit: Literal["rpm", "hz"] = "rpm"
    """Unit of a speed series."""

    @model_validator(mode="after")
    def _unique_bearings(self):
        names = [bearing.name for bearing in self.bearings]
        if len(set(names)) != len(names):
            raise ValueError(f"bearing names must be unique, got {names}")
        return self


class FaultSignatures:
    """Scores of vibration fault signatures at orders of the shaft speed, against a healthy baseline.

    The amplitude of each fault's order is the largest spectrum value within ``order_tolerance``
    of the order's frequency, or the linear interpolation at that frequency when no bin lies
    that close. Fitting on healthy data stores, per entity and fault, the mean and standard
    deviation of the natural log of that amplitude (the deviation floored at
    ``min_log_spread``). A score is the upward deviation ``z`` in those deviations mapped like a
    control chart: ``z / 2`` up to ``z = 2`` (warning, score 1), then ``1 + (z - 2)``, so
    ``z = 3`` is critical (score 2). A falling amplitude scores 0.

    Parameters
    ----------
    params : FaultSignatureParams
        Bearings, the order tolerance, the baseline spread floor and the constant speed.

    Examples
    --------
    >>> frequencies = np.arange(0.0, 200.0, 1.0)
    >>> rng = np.random.default_rng(0)
    >>> healthy = 0.01 * (1 + 0.05 * rng.standard_normal((1, 50, 200)))
    >>> healthy[:, :, 25] += 1.0  # 1x peak of a shaft at 1500 rpm
    >>> signatures = FaultSignatures(FaultSignatureParams(running_speed_rpm=1500)).fit(healthy, frequencies)
    >>> faulty = healthy[:, :2].copy()
    >>> faulty[:, 1, 25] *= 3.0  # imbalance: the 1x amplitude triples
    >>> scores = signatures.score(faulty, frequencies)
    >>> signatures.faults_
    ['imbalance', 'misalignment']
    >>> bool(scores[0, 0, 0] < 1), bool(scores[0, 0, 1] >= 2)
    (True, True)
    """

    def __init__(self, params: FaultSignatureParams):
        self.params = params

    @property
    def orders(self) -> list[tuple[str, str, float]]:
        """Return (fault, bearing name or "", order) for every scored fault, in score order."""
        result = [("imbalance", "", 1.0), ("misalignment", "", 2.0)]
        for bearing in self.params.bearings:
            result.append(("bearing_outer", bearing.name, bearing.bpfo))
            result.append(("bearing_inner", bearing.name, bearing.bpfi))
        return result

    def fit(self, spectra, frequencies_hz, speed=None) -> "FaultSignatures":
        """Learn each entity's healthy log amplitude at every fault order.

        ``spectra`` is (entities, time, bins) amplitudes at ``frequencies_hz`` (bins,),
        ``speed`` is (entities, time) in ``speed_unit`` or None for the constant speed.
        """
        amplitudes = self.order_amplitudes(spectra, frequencies_hz, speed)
        floor = LOG_FLOOR_RATIO * np.nanmedian(np.asarray(spectra, dtype=np.float64)) + 1e-300
        logs = np.log(amplitudes + floor)
        with np.errstate(invalid="ignore"):
            self.log_mean_ = np.nanmean(logs, axis=1)
            spread = np.nanstd(logs, axis=1)
        self.log_spread_ = np.fmax(np.nan_to_num(spread), self.params.min_log_spread)
        self.log_floor_ = float(floor)
        self.faults_ = [fault for fault, _, _ in self.orders]
        self.bearings_ = [bearing for _, bearing, _ in self.orders]
        return self

    def score(self, spectra, frequencies_hz, speed=None) -> np.ndarray:
        """Score each fault at each time: shape (entities, faults, time), NaN where unknown."""
        amplitudes = self.order_amplitudes(spectra, frequencies_hz, speed)
        logs = np.log(amplitudes + self.log_floor_)
        z = (logs - self.log_mean_[:, None, :]) / self.log_spread_[:, None, :]
        return np.moveaxis(chart_score(np.maximum(z, 0.0)), 2, 1)

    def order_amplitudes(self, spectra, frequencies_hz, speed=None) -> np.ndarray:
        """Return the amplitude at every fault order: shape (entities, time, faults)."""
        spectra = np.asarray(spectra, dtype=np.float64)
        frequencies = np.asarray(frequencies_hz, dtype=np.float64)
        if spectra.ndim != 3 or spectra.shape[-1] != frequencies.shape[0]:
            raise ValueError(
                f"spectra must have shape (entities, time, bins) with one bin per frequency: got {spectra.shape} "
                f"for {frequencies.shape[0]} frequencies"
            )
        if frequencies.size > 1 and np.any(np.diff(frequencies) <= 0):
            raise ValueError("frequencies_hz must be strictly increasing")
        shaft_hz = self._shaft_hz(speed, spectra.shape[:2])
        orders = np.array([order for _, _, order in self.orders])
        targets = shaft_hz[..., None] * orders
        tolerance = self.params.order_tolerance * targets

        # Largest bin inside each order's tolerance band, for all entities, times and orders.
        distance = np.abs(frequencies[None, None, None, :] - targets[..., None])
        inside = distance <= tolerance[..., None]
        peak = np.max(np.where(inside, spectra[:, :, None, :], -np.inf), axis=-1)

        # Linear interpolation where the band contains no bin (a coarse spectrum).
        position = np.clip(np.searchsorted(frequencies, targets) - 1, 0, max(frequencies.size - 2, 0))
        upper = np.minimum(position + 1, frequencies.size - 1)
        span = np.where(upper > position, frequencies[upper] - frequencies[position], 1.0)
        weight = np.clip((targets - frequencies[position]) / span, 0.0, 1.0)
        low_values = np.take_along_axis(spectra, position.reshape(*position.shape[:2], -1), axis=-1)
        high_values = np.take_along_axis(spectra, upper.reshape(*upper.shape[:2], -1), axis=-1)
        interpolated = low_values * (1 - weight) + high_values * weight
        beyond = targets > frequencies[-1]
        result = np.where(np.isfinite(peak), peak, interpolated)
        return np.where(beyond | ~np.isfinite(targets), np.nan, result)

    def _shaft_hz(self, speed, shape) -> np.ndarray:
        if speed is None:
            if self.params.running_speed_rpm is None:
                raise ValueError("no shaft speed: pass a speed series or set running_speed_rpm")
            return np.full(shape, self.params.running_speed_rpm / 60.0)
        speed = np.asarray(speed, dtype=np.float64)
        if speed.shape != shape:
            raise ValueError(f"speed must have shape (entities, time) = {shape}, got {speed.shape}")
        shaft_hz = speed / 60.0 if self.params.speed_unit == "rpm" else speed
        # A stopped or unknown shaft has no orders to score.
        return np.where(shaft_hz > 0, shaft_hz, np.nan)

    def get_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Return the baseline as numeric arrays and a JSON-serialisable dict."""
        arrays = {"log_mean": self.log_mean_, "log_spread": self.log_spread_}
        meta = {"log_floor": self.log_floor_, "faults": self.faults_, "bearings": self.bearings_}
        return arrays, meta

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict) -> "FaultSignatures":
        """Restore a baseline saved by ``get_state``; raises ValueError when it does not fit the params."""
        faults = [fault for fault, _, _ in self.orders]
        bearings = [bearing for _, bearing, _ in self.orders]
        if meta.get("faults") != faults or meta.get("bearings") != bearings:
            raise ValueError(f"saved faults {meta.get('faults')} do not match the configured faults {faults}")
        log_mean = np.asarray(arrays["log_mean"], dtype=np.float64)
        log_spread = np.asarray(arrays["log_spread"], dtype=np.float64)
        if log_mean.ndim != 2 or log_mean.shape[1] != len(faults) or log_spread.shape != log_mean.shape:
            raise ValueError(f"saved baseline has shape {log_mean.shape}, expected (entities, {len(faults)})")
        self.log_mean_, self.log_spread_ = log_mean, log_spread
        self.log_floor_ = float(meta["log_floor"])
        self.faults_, self.bearings_ = faults, bearings
        return self

