"""Seasonal baseline: a robust time-of-day (and day-of-week) profile around a tracked level.

Each series is modelled as ``level + season(time of week) + noise``. The profile is the
median of the detrended series per bucket of the local clock, the noise scale is a robust
standard deviation per time-of-day bucket, and the level follows slow drift during scoring.
The score is the deviation in robust standard deviations divided by ``band_sigmas``, so 1
is the band edge (warning) and 2 is twice as far out (critical) for every series alike.
"""

import warnings
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from detectors._stats import (
    MAD_TO_SIGMA,
    Q90_TO_SIGMA,
    fill_nan_nearest,
    grouped_row_median,
    grouped_row_quantiles,
    grouped_valid_count,
    row_median,
    row_quantiles,
)
from detectors.base import STATE_FORMAT_VERSION, Detector, Scores, StateError, check_panel
from exporter.durations import parse_duration

DAY = 86400.0
WEEK = 7 * DAY

# Seasonality codes stored per series.
NONE, DAILY, WEEKLY = 0, 1, 2
SEASONALITY_NAMES = {NONE: "none", DAILY: "daily", WEEKLY: "weekly"}

# Two-sided 99% quantile of the standard normal distribution.
NORMAL_Q99 = 2.5758

# Resolution of the weekday offsets that turn the daily profile into a weekly one.
WEEKLY_BLOCK = 3600.0

# Half-lives the level tracking chooses from with ``level_halflife: auto``, fast to slow.
HALFLIFE_CANDIDATES = (1800.0, 7200.0, 21600.0, 86400.0)

# Newest columns of the fit window replayed through the level tracker to choose its speed
# and to measure the one-step noise.
TRACKER_COLUMNS = 2016

# Span of the newest fit data whose one-step errors set the noise scale per time of day. It
# must cover a whole day, because hours it misses fall back to the scale of the hours it has.
# TRACKER_COLUMNS alone covers less than a day at steps under 43 s (5.6 hours at 10 s).
# At 10 s this makes a fit 1.6 to 3 times slower, with 4 to 8 % more memory (bench/fine_step.py).
SPREAD_SPAN = 1.25 * 86400

# Columns used to choose the seasonality and to estimate resolution and tails. An even subset
# of 14 days at 5 minutes keeps the estimates stable at a third of the cost.
SELECTION_COLUMNS = 1344

# Scores are capped here because beyond it the size carries no more meaning, and sums or
# averages of scores in rules and dashboards stay readable.
MAX_SCORE = 100.0

# Floor of the noise scale as a share of the series' 1st-to-99th percentile range.
RANGE_FLOOR_RATIO = 0.01

# Most a heavy tail may widen the band. Student's t noise with 3 degrees of freedom needs
# about 2; anomalies inside the fit window would push it far higher and hide the next ones.
MAX_TAIL_FACTOR = 3.0

# Prior weight, in samples, of a series' overall spread in each time-of-day bucket's spread.
SPREAD_PRIOR_SAMPLES = 30.0


def _duration(value):
    return parse_duration(value) if isinstance(value, str) else value


class SeasonalParams(BaseModel):
    """Parameters of the ``seasonal`` detector type (the ``params`` key of a detector)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seasonality: Literal["auto", "none", "daily", "weekly"] = "auto"
    """Cycle to model; ``auto`` picks daily, weekly or none per series from the fitted data."""

    band_sigmas: float = Field(default=3.0, gt=0, le=100)
    """Half-width of the band in robust standard deviations (score 1); critical is twice as far."""

    bucket: str = "30m"
    """Resolution of the seasonal profile; must divide a day."""

    min_history: str = "1d"
    """History with data a series needs before it is scored."""

    level_halflife: str = "auto"
    """Half-life of the level tracking, or ``auto`` to pick per series the one that predicts best."""

    min_seasonal_strength: float = Field(default=0.2, ge=0, le=1)
    """Share of variance a cycle must explain for ``auto`` to choose it."""

    min_spread_ratio: float = Field(default=0.01, ge=0)
    """Floor of the noise scale as a fraction of the series' typical absolute level."""

    min_spread: float = Field(default=0.0, ge=0)
    """Floor of the noise scale in the input's unit."""

    @field_validator("bucket", "min_history", "level_halflife")
    @classmethod
    def _valid_duration(cls, value: str, info) -> str:
        if value == "auto" and info.field_name == "level_halflife":
            return value
        seconds = parse_duration(value)
        if seconds <= 0:
            raise ValueError(f"expected a positive duration, got {value!r}")
        return value

    @field_validator("bucket")
    @classmethod
    def _divides_day(cls, value: str) -> str:
        seconds = parse_duration(value)
        if DAY % seconds != 0:
            raise ValueError(f"bucket {value!r} must divide one day evenly, such as 5m, 15m, 30m or 1h")
        return value


def _local_clock(timestamps: np.ndarray, timezone: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (seconds since local midnight, seconds since local Monday 00:00) for unix timestamps."""
    local = pd.to_datetime(timestamps, unit="s", utc=True).tz_convert(timezone)
    seconds_of_day = (local.hour * 3600 + local.minute * 60 + local.second).to_numpy(dtype=np.float64)
    seconds_of_week = local.day_of_week.to_numpy(dtype=np.float64) * DAY + seconds_of_day
    return seconds_of_day, seconds_of_week


def _bucket_weights(seconds: np.ndarray, bucket: float, n_buckets: int):
    """Return the two neighbouring bucket indices and the weight of the second, for interpolation."""
    position = seconds / bucket - 0.5
    low = np.floor(position)
    weight = position - low
    first = low.astype(np.int64) % n_buckets
    second = (first + 1) % n_buckets
    return first, second, weight


def _interpolate(profile: np.ndarray, first, second, weight) -> np.ndarray:
    weight = weight.astype(profile.dtype)
    return profile[:, first] * (1 - weight) + profile[:, second] * weight


def _even_subset(size: int, limit: int) -> np.ndarray:
    """Return at most ``limit`` evenly spaced indices of ``range(size)``, always including the last."""
    if size <= limit:
        return np.arange(size)
    return np.unique(np.linspace(0, size - 1, limit).round().astype(np.int64))


def _robust_sigma(quantiles: np.ndarray) -> np.ndarray:
    """Turn the 50th and 90th percentiles of absolute deviations (last axis) into one noise scale."""
    return np.fmax(MAD_TO_SIGMA * quantiles[..., 0], Q90_TO_SIGMA * quantiles[..., 1])


def _mad(values: np.ndarray) -> np.ndarray:
    return row_median(np.abs(values - row_median(values)[:, None].astype(values.dtype)))


class SeasonalDetector(Detector):
    """Seasonal per-series baseline with a robust band, vectorised over all series.

    Parameters
    ----------
    params : SeasonalParams
        ``band_sigmas`` sets how far from the baseline the warning edge sits, in robust
        standard deviations; ``seasonality`` fixes or auto-detects the cycle; ``min_history``
        is the cold start; ``level_halflife`` sets how fast the baseline follows drift.
    step : float
        Seconds between samples.
    timezone : str
        IANA zone whose local clock the daily and weekly cycles follow.
    direction : str
        "both", "up" or "down".

    Examples
    --------
    >>> import numpy as np
    >>> step = 300.0
    >>> t = np.arange(0, 8 * 86400, step)
    >>> rng = np.random.default_rng(0)
    >>> clean = 10 + 5 * np.sin(2 * np.pi * t / 86400) + rng.normal(0, 0.2, t.size)
    >>> detector = SeasonalDetector(SeasonalParams(), step=step).fit(clean[None, :-12], t[:-12])
    >>> tail = clean[-12:].copy()
    >>> tail[6] += 4.0
    >>> scores = detector.score(tail[None, :], t[-12:]).score[0]
    >>> bool(scores[6] > 2), bool(np.all(np.delete(scores, 6) < 1))
    (True, True)
    """

    Params = SeasonalParams
    type_name = "seasonal"

    def fit(self, values, timestamps) -> "SeasonalDetector":
        """Learn each series' profile, noise scale, seasonality and current level."""
        values, timestamps = check_panel(values, timestamps, step=self.step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self._fit(values, timestamps)
        return self

    def _fit(self, values: np.ndarray, timestamps: np.ndarray) -> None:
        params = self.params
        self.bucket_ = self._effective_bucket()
        self.day_buckets_ = int(DAY // self.bucket_)
        week_buckets = 7 * self.day_buckets_
        n_series = values.shape[0]

        # Which series have enough history, and how much of it.
        valid = ~np.isnan(values)
        count = valid.sum(axis=1)
        self.ready_mask_ = count * self.step >= parse_duration(params.min_history)
        span = self._span_seconds(valid, timestamps)

        # Detrend with smoothed daily medians so that the profile contains only the cycle. Values
        # minus their median are small next to the level, so float32 keeps enough precision
        # at half the memory traffic.
        columns = _even_subset(timestamps.size, SELECTION_COLUMNS)
        offset = row_median(values[:, columns])
        offset = np.where(np.isnan(offset), 0.0, offset)
        detrended = (values - offset[:, None]).astype(np.float32)
        detrended -= self._trend(detrended, timestamps, span)
        seconds_of_day, seconds_of_week = _local_clock(timestamps, self.timezone)
        day_bucket = (seconds_of_day // self.bucket_).astype(np.int64) % self.day_buckets_
        week_bucket = (seconds_of_week // self.bucket_).astype(np.int64) % week_buckets

        # Candidate profiles, centred so the level is the median.
        daily = grouped_row_median(detrended, day_bucket, self.day_buckets_)
        daily = np.nan_to_num(daily - row_median(daily)[:, None])
        # The weekly profile is the daily one plus an offset per weekday and block of
        # WEEKLY_BLOCK hours. Two weeks give only two samples per weekly bucket, so a full
        # weekly profile would learn last week's anomalies; a block has hundreds.
        weekly = np.tile(daily, 7)
        long_enough = span >= 13 * DAY
        if self.params.seasonality in ("auto", "weekly") and long_enough.any():
            rows = np.flatnonzero(long_enough)
            day_pos_all = _bucket_weights(seconds_of_day, self.bucket_, self.day_buckets_)
            beyond_daily = detrended[rows] - _interpolate(daily[rows].astype(np.float32), *day_pos_all)
            blocks_per_day = int(DAY // WEEKLY_BLOCK)
            block = (seconds_of_week // WEEKLY_BLOCK).astype(np.int64) % (7 * blocks_per_day)
            offsets = np.nan_to_num(grouped_row_median(beyond_daily, block, 7 * blocks_per_day))
            del beyond_daily
            bucket_block = ((np.arange(week_buckets) * self.bucket_) // WEEKLY_BLOCK).astype(np.int64)
            weekly_rows = weekly[rows] + offsets[:, bucket_block]
            weekly[rows] = weekly_rows - row_median(weekly_rows)[:, None]

        # Choose the cycle per series by how much of the spread it removes, judged on an
        # evenly spaced subset of at most SELECTION_COLUMNS columns.
        day_pos = _bucket_weights(seconds_of_day, self.bucket_, self.day_buckets_)
        week_pos = _bucket_weights(seconds_of_week, self.bucket_, week_buckets)
        sample = detrended[:, columns]
        base_spread = _mad(sample)
        daily_spread = _mad(sample - _interpolate(daily, *(p[columns] for p in day_pos)))
        weekly_spread = _mad(sample - _interpolate(weekly, *(p[columns] for p in week_pos)))
        del sample
        self.seasonality_ = self._choose_seasonality(
            base_spread, daily_spread, weekly_spread, span, n_series
        )

        # One weekly-sized profile per series; a daily cycle repeats seven times.
        profile = np.zeros((n_series, week_buckets))
        is_daily = self.seasonality_ == DAILY
        is_weekly = self.seasonality_ == WEEKLY
        profile[is_daily] = np.tile(daily[is_daily], 7)
        profile[is_weekly] = weekly[is_weekly]
        self.profile_ = profile.astype(np.float32)

        # Level tracking: per series, choose how fast the level follows the data by the
        # one-step-ahead error over the newest TRACKER_COLUMNS columns. Then track over at least
        # SPREAD_SPAN and keep those errors, which set the noise scale.
        spread_columns = max(TRACKER_COLUMNS, int(np.ceil(SPREAD_SPAN / self.step)))
        window = slice(max(0, timestamps.size - spread_columns), None)
        recent = (values[:, window] - offset[:, None]).astype(np.float32)
        recent -= _interpolate(self.profile_, *(p[window] for p in week_pos))
        floor = self._spread_floor(values[:, columns])
        newest = recent[:, max(0, recent.shape[1] - TRACKER_COLUMNS) :]
        steps = np.diff(newest, axis=1)
        rough = np.maximum(np.nan_to_num(MAD_TO_SIGMA * _mad(steps) / np.sqrt(2)), floor)
        del steps
        self.halflife_ = self._choose_halflife(newest, rough)
        level, errors = self._track(recent, rough, self.halflife_, keep_errors=True)
        level = self._accept_lasting_shift(recent, level, rough)
        burn_in = errors.shape[1] // 10
        errors = errors[:, burn_in:]
        error_bucket = day_bucket[window][burn_in:]

        # Noise scale per time-of-day bucket, shrunk toward the series' overall scale.
        errors -= row_median(errors)[:, None].astype(np.float32)
        np.abs(errors, out=errors)
        # The overall scale is the larger of the MAD-based and the 90th-percentile-based
        # estimate, which agree for normal noise; the second keeps quantised series that mostly
        # repeat one value, but often jump by a step, from alerting on every step. Buckets use
        # the MAD only: a bucket has a few dozen samples, and a handful of large errors from
        # one incident would otherwise widen the band at that time of day for a whole week.
        overall = _robust_sigma(row_quantiles(errors, [0.5, 0.9]))
        bucket_mad = MAD_TO_SIGMA * grouped_row_median(errors, error_bucket, self.day_buckets_)
        samples = grouped_valid_count(errors, error_bucket, self.day_buckets_)
        bucket_mad = np.where(np.isnan(bucket_mad), overall[:, None], bucket_mad)
        spread = np.sqrt(
            (samples * bucket_mad**2 + SPREAD_PRIOR_SAMPLES * overall[:, None] ** 2)
            / (samples + SPREAD_PRIOR_SAMPLES)
        )

        # Floors: the series' resolution and a fraction of its level keep flat series quiet.
        spread = np.maximum(np.nan_to_num(spread), floor[:, None])

        # Widen series whose tails are heavier than normal so one threshold fits all.
        z = errors / spread[:, error_bucket]
        tail = row_quantiles(z, [0.99])[:, 0]
        self.tail_factor_ = np.clip(np.nan_to_num(tail / NORMAL_Q99, nan=1.0), 1.0, MAX_TAIL_FACTOR)
        self.spread_ = (spread * self.tail_factor_[:, None]).astype(np.float32)
        del errors, z

        # Level at the end of the fit window, where scoring continues.
        self.level_ = level.astype(np.float64) + offset
        self.fitted_until_ = float(timestamps[-1]) if timestamps.size else 0.0
        self.ready_mask_ &= np.isfinite(self.level_)
        self.level_ = np.nan_to_num(self.level_)

    def _accept_lasting_shift(self, recent: np.ndarray, level: np.ndarray, rough: np.ndarray) -> np.ndarray:
        """Move the level to the recent median when the data has stayed off the band since a while.

        The tracker moves at most ``band_sigmas`` noise units per step, so a large lasting
        shift would otherwise keep alerting until many refits later. A shift that held for
        the last half-life before a refit becomes the new normal.
        """
        width = recent.shape[1]
        columns = np.clip(np.round(self.halflife_ / self.step).astype(np.int64), 12, width)
        starts = width - columns
        positions = np.arange(width)[None, :]
        latest = np.where(positions >= starts[:, None], recent, np.nan)
        recent_level = row_median(latest)
        shifted = np.abs(recent_level - level) > self.params.band_sigmas * rough
        return np.where(shifted & np.isfinite(recent_level), recent_level, level).astype(level.dtype)

    def _halflife_candidates(self) -> tuple[float, ...]:
        if self.params.level_halflife == "auto":
            return HALFLIFE_CANDIDATES
        return (parse_duration(self.params.level_halflife),)

    def _choose_halflife(self, recent: np.ndarray, rough: np.ndarray) -> np.ndarray:
        """Pick per series the slowest candidate whose one-step error is within 5 % of the best."""
        candidates = self._halflife_candidates()
        n_series = recent.shape[0]
        if len(candidates) == 1:
            return np.full(n_series, candidates[0])
        # All candidates run in one pass over the columns, stacked as extra rows.
        stacked = np.repeat(np.asarray(candidates), n_series)
        _, cost = self._track(np.tile(recent, (len(candidates), 1)), np.tile(rough, len(candidates)), stacked)
        costs = cost.reshape(len(candidates), n_series)
        best = np.nanmin(costs, axis=0)
        acceptable = costs <= 1.05 * best[None, :] + 1e-12
        # Candidates are sorted from fast to slow, so the last acceptable one is the slowest.
        slowest = len(candidates) - 1 - np.argmax(acceptable[::-1], axis=0)
        slowest = np.where(np.isfinite(best), slowest, len(candidates) - 1)
        return np.asarray(candidates)[slowest]

    def _track(self, recent, rough, halflife, keep_errors=False):
        """Run the level tracker of ``score`` over ``recent`` (deseasonalised, centred values).

        Returns the final level and either every one-step error (``keep_errors``) or the
        mean clipped absolute error in units of ``rough``, the cost used to pick a half-life.
        """
        n_series, width = recent.shape
        alpha = (1.0 - 0.5 ** (self.step / halflife)).astype(np.float32)
        limit = (self.params.band_sigmas * rough).astype(np.float32)
        start = recent[:, : max(3, min(width, 12))]
        level = np.nan_to_num(row_median(start)).astype(np.float32)
        burn_in = width // 10
        errors = np.empty((n_series, width), dtype=np.float32) if keep_errors else None
        cost = np.zeros(n_series)
        counted = np.zeros(n_series)
        for column in range(width):
            error = recent[:, column] - level
            missing = np.isnan(error)
            clipped = np.clip(np.where(missing, 0.0, error), -limit, limit)
            level += alpha * clipped
            if keep_errors:
                errors[:, column] = error
            elif column >= burn_in:
                cost += np.abs(clipped)
                counted += ~missing
        if keep_errors:
            return level, errors
        with np.errstate(invalid="ignore", divide="ignore"):
            return level, cost / counted / rough

    def _effective_bucket(self) -> float:
        bucket = parse_duration(self.params.bucket)
        while bucket < self.step or DAY % bucket:
            bucket += 1.0
        return bucket

    def _span_seconds(self, valid: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
        """Return the history each row covers: from its first to its last sample, plus one step.

        Each sample stands for one step, so 13 days of 5-minute samples cover 13 days, not
        13 days minus 5 minutes, and meet the 13-day rule of the weekly cycle.
        """
        if timestamps.size == 0:
            return np.zeros(valid.shape[0])
        first = np.argmax(valid, axis=1)
        last = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)
        span = timestamps[last] - timestamps[first] + self.step
        return np.where(valid.any(axis=1), span, 0.0)

    def _trend(self, values: np.ndarray, timestamps: np.ndarray, span: np.ndarray) -> np.ndarray:
        """Piecewise-linear trend through daily medians, smoothed over a week when there is one."""
        if timestamps.size == 0:
            return np.zeros_like(values)
        days_back = np.floor((timestamps[-1] - timestamps) / DAY).astype(np.int64)
        n_days = int(days_back.max()) + 1
        day_index = n_days - 1 - days_back
        medians = grouped_row_median(values, day_index, n_days)
        if n_days >= 7 and np.any(span >= 13 * DAY):
            smoothed = np.full_like(medians, np.nan)
            for day in range(n_days):
                window = medians[:, max(0, day - 3) : day + 4]
                smoothed[:, day] = row_median(window)
            long_history = span >= 13 * DAY
            medians = np.where(long_history[:, None], smoothed, medians)
        medians = fill_nan_nearest(medians)

        # Day d is centred half a day after its start; interpolate between centres.
        centre = timestamps[-1] - (n_days - 1 - np.arange(n_days)) * DAY - DAY / 2
        position = np.interp(timestamps, centre, np.arange(n_days, dtype=np.float64))
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, n_days - 1)
        weight = position - low
        # Linear interpolation as one matrix product: each column mixes two day medians.
        mixing = np.zeros((n_days, timestamps.size), dtype=values.dtype)
        columns = np.arange(timestamps.size)
        mixing[low, columns] += 1 - weight
        mixing[high, columns] += weight
        return medians.astype(values.dtype) @ mixing

    def _choose_seasonality(self, base, daily, weekly, span, n_series) -> np.ndarray:
        fixed = {"none": NONE, "daily": DAILY, "weekly": WEEKLY}
        if self.params.seasonality in fixed:
            return np.full(n_series, fixed[self.params.seasonality], dtype=np.int8)
        with np.errstate(divide="ignore", invalid="ignore"):
            daily_strength = np.where(base > 0, 1 - (daily / base) ** 2, 0.0)
            weekly_strength = np.where(base > 0, 1 - (weekly / base) ** 2, 0.0)
        threshold = self.params.min_seasonal_strength
        choice = np.full(n_series, NONE, dtype=np.int8)
        choice[(daily_strength >= threshold) & (span >= 2 * DAY)] = DAILY
        # A weekly profile has seven times fewer samples per bucket, so it must earn its place.
        weekly_better = (weekly_strength >= threshold) & (weekly_strength >= daily_strength + 0.1)
        choice[weekly_better & (span >= 13 * DAY)] = WEEKLY
        return choice

    def _spread_floor(self, values: np.ndarray) -> np.ndarray:
        ordered = np.sort(values, axis=1)
        steps = np.diff(ordered, axis=1)
        scale = np.nanmax(np.abs(ordered), axis=1, initial=0.0, where=~np.isnan(ordered))
        meaningful = steps > 1e-9 * np.maximum(scale, 1e-300)[:, None]
        resolution = np.min(np.where(meaningful, steps, np.inf), axis=1, initial=np.inf)
        resolution = np.where(np.isfinite(resolution), resolution, 0.0)
        low, typical, high = row_quantiles(values, [0.01, 0.5, 0.99], sorted_values=ordered).T
        floor = np.maximum(resolution, self.params.min_spread_ratio * np.nan_to_num(np.abs(typical)))
        # A series whose neighbouring samples rarely differ (bursts on a flat line, steps)
        # has a near-zero one-step noise; a share of its usual range bounds its scores.
        floor = np.maximum(floor, RANGE_FLOOR_RATIO * np.nan_to_num(high - low))
        floor = np.maximum(floor, self.params.min_spread)
        # A series that never moved and sits at zero still needs a positive scale.
        return np.maximum(floor, 1e-9)

    @property
    def ready_(self) -> np.ndarray:
        return self.ready_mask_

    def score(self, values, timestamps, rows=None) -> Scores:
        """Score each column in order and move each series' level toward its new data."""
        values, timestamps = check_panel(values, timestamps, step=self.step)
        rows = np.arange(values.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
        shape = values.shape
        score = np.full(shape, np.nan)
        expected = np.full(shape, np.nan)
        spread_at = np.full(shape, np.nan)
        if values.size == 0:
            return Scores(score, expected, expected.copy(), expected.copy())

        _, seconds_of_week = _local_clock(timestamps, self.timezone)
        seconds_of_day = seconds_of_week % DAY
        week_pos = _bucket_weights(seconds_of_week, self.bucket_, self.profile_.shape[1])
        day_bucket = (seconds_of_day // self.bucket_).astype(np.int64) % self.day_buckets_
        season = _interpolate(self.profile_[rows], *week_pos)
        spread = self.spread_[rows][:, day_bucket].astype(np.float64)
        ready = self.ready_mask_[rows]
        alpha = 1.0 - 0.5 ** (self.step / self.halflife_[rows])
        band = self.params.band_sigmas
        level = self.level_[rows].copy()

        # Walk forward in time; each step is vectorised over every series.
        for column in range(shape[1]):
            observed = values[:, column]
            baseline = level + season[:, column]
            deviation = observed - baseline
            expected[:, column] = baseline
            spread_at[:, column] = spread[:, column]
            score[:, column] = np.minimum(self.directional(deviation / spread[:, column]) / band, MAX_SCORE)
            has_value = ~np.isnan(observed)
            limit = band * spread[:, column]
            step_change = alpha * np.clip(deviation, -limit, limit)
            level = np.where(has_value, level + step_change, level)

        self.level_[rows] = level
        self.fitted_until_ = max(self.fitted_until_, float(timestamps[-1]))
        not_ready = ~ready
        score[not_ready] = np.nan
        expected[not_ready] = np.nan
        half_width = band * spread_at
        return Scores(score, expected, expected - half_width, expected + half_width)

    def get_state(self):
        arrays = {
            "profile": self.profile_,
            "spread": self.spread_,
            "level": self.level_,
            "ready": self.ready_mask_,
            "seasonality": self.seasonality_,
            "tail_factor": self.tail_factor_,
            "halflife": self.halflife_,
        }
        meta = {
            "format_version": STATE_FORMAT_VERSION,
            "type": self.type_name,
            "bucket": self.bucket_,
            "day_buckets": self.day_buckets_,
            "fitted_until": self.fitted_until_,
        }
        return arrays, meta

    def set_state(self, arrays, meta):
        if meta.get("format_version") != STATE_FORMAT_VERSION or meta.get("type") != self.type_name:
            raise StateError(
                f"state is for type {meta.get('type')!r} format {meta.get('format_version')!r}, "
                f"expected {self.type_name!r} format {STATE_FORMAT_VERSION}"
            )
        try:
            profile = np.asarray(arrays["profile"], dtype=np.float32)
            spread = np.asarray(arrays["spread"], dtype=np.float32)
            level = np.asarray(arrays["level"], dtype=np.float64)
            ready = np.asarray(arrays["ready"], dtype=bool)
            seasonality = np.asarray(arrays["seasonality"], dtype=np.int8)
            tail_factor = np.asarray(arrays["tail_factor"], dtype=np.float64)
            halflife = np.asarray(arrays["halflife"], dtype=np.float64)
            bucket = float(meta["bucket"])
            day_buckets = int(meta["day_buckets"])
        except (KeyError, TypeError, ValueError) as error:
            raise StateError(f"state is incomplete or malformed: {error}") from None
        if level.ndim != 1:
            raise StateError(f"state array 'level' has shape {level.shape}, expected one value per series")
        n_series = level.shape[0]
        expected_shapes = {
            "profile": (profile.shape, (n_series, 7 * day_buckets)),
            "spread": (spread.shape, (n_series, day_buckets)),
            "ready": (ready.shape, (n_series,)),
            "seasonality": (seasonality.shape, (n_series,)),
            "tail_factor": (tail_factor.shape, (n_series,)),
            "halflife": (halflife.shape, (n_series,)),
        }
        for name, (actual, wanted) in expected_shapes.items():
            if actual != wanted:
                raise StateError(f"state array {name!r} has shape {actual}, expected {wanted}")
        if bucket != self._effective_bucket() or day_buckets * bucket != DAY:
            raise StateError(f"state bucket {bucket:g}s does not match the configured bucket")
        if not (np.all(np.isfinite(profile)) and np.all(np.isfinite(spread)) and np.all(spread > 0)
                and np.all(np.isfinite(level)) and np.all(halflife > 0)):
            raise StateError("invalid state: non-finite or non-positive values; the detector will be refitted")
        self.profile_, self.spread_, self.level_ = profile, spread, level
        self.ready_mask_, self.seasonality_, self.tail_factor_ = ready, seasonality, tail_factor
        self.halflife_ = halflife
        self.bucket_, self.day_buckets_ = bucket, day_buckets
        fitted_until = float(meta.get("fitted_until", 0.0))
        if not np.isfinite(fitted_until) or not 0 <= fitted_until < 1e11:
            raise StateError(f"state has an invalid fitted_until {fitted_until!r}")
        self.fitted_until_ = fitted_until
        return self
