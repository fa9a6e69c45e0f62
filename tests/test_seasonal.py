"""The seasonal detector on synthetic series with known anomalies and on awkward inputs."""

import numpy as np
import pytest

from detectors.seasonal import DAILY, NONE, WEEKLY, SeasonalDetector, SeasonalParams

STEP = 300.0
DAY = 86400.0
# A Monday 00:00 UTC, so weekday effects line up with the calendar.
START = 1_767_571_200.0


def make_detector(**params) -> SeasonalDetector:
    direction = params.pop("direction", "both")
    timezone = params.pop("timezone", "UTC")
    return SeasonalDetector(SeasonalParams(**params), step=STEP, timezone=timezone, direction=direction)


def timeline(days: float) -> np.ndarray:
    return START + np.arange(0, days * DAY, STEP)


def daily_series(t, n, *, level=100.0, amplitude=30.0, noise=2.0, seed=0):
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1))
    return level + amplitude * np.sin(2 * np.pi * t / DAY + phase) + rng.normal(0, noise, (n, t.size))


def split(values, t, train_days):
    cut = int(train_days * DAY / STEP)
    return values[:, :cut], t[:cut], values[:, cut:], t[cut:]


def test_spikes_found_clean_quiet():
    t = timeline(10)
    values = daily_series(t, 20, seed=1)
    train, t_train, test, t_test = split(values, t, 8)
    test = test.copy()
    spikes = {(3, 100): 25.0, (7, 300): -30.0, (12, 450): 15.0}
    for (row, column), size in spikes.items():
        test[row, column] += size
    scores = make_detector().fit(train, t_train).score(test, t_test).score

    for (row, column), size in spikes.items():
        assert scores[row, column] >= 2, f"spike of {size} on series {row} scored {scores[row, column]:.2f}"
    mask = np.ones_like(scores, dtype=bool)
    for row, column in spikes:
        mask[row, column] = False
    false_alarm_rate = np.mean(scores[mask] >= 1)
    assert false_alarm_rate < 0.005
    assert np.max(scores[mask]) < 2


def test_seasonal_swing_not_anomalous():
    # A large daily swing is expected behaviour: the band must follow it.
    t = timeline(6)
    values = daily_series(t, 5, amplitude=200.0, noise=3.0, seed=2)
    train, t_train, test, t_test = split(values, t, 5)
    result = make_detector().fit(train, t_train).score(test, t_test)
    assert np.mean(result.score >= 1) < 0.01
    inside = (test >= result.lower) & (test <= result.upper)
    assert np.mean(inside) > 0.99


def test_auto_seasonality_choice():
    t = timeline(21)
    rng = np.random.default_rng(3)
    flat = 50 + rng.normal(0, 1, t.size)
    daily = 50 + 20 * np.sin(2 * np.pi * t / DAY) + rng.normal(0, 1, t.size)
    weekday = ((t - START) // DAY) % 7 < 5
    office_hours = ((t - START) % DAY >= 9 * 3600) & ((t - START) % DAY < 17 * 3600)
    weekly = 10 + 40 * (weekday & office_hours) + rng.normal(0, 1, t.size)
    detector = make_detector().fit(np.vstack([flat, daily, weekly]), t)
    assert detector.seasonality_[0] == NONE
    assert detector.seasonality_[1] == DAILY
    assert detector.seasonality_[2] == WEEKLY


def test_weekend_not_anomalous_with_weekly():
    t = timeline(21)
    rng = np.random.default_rng(4)
    weekday = ((t - START) // DAY) % 7 < 5
    office_hours = ((t - START) % DAY >= 9 * 3600) & ((t - START) % DAY < 17 * 3600)
    values = (10 + 40 * (weekday & office_hours) + rng.normal(0, 1, t.size))[None, :]
    train, t_train, test, t_test = split(values, t, 14)
    scores = make_detector().fit(train, t_train).score(test, t_test).score
    assert np.mean(scores >= 1) < 0.01


def test_fixed_seasonality_respected():
    t = timeline(4)
    values = daily_series(t, 2, seed=5)
    detector = make_detector(seasonality="none").fit(values, t)
    assert np.all(detector.seasonality_ == NONE)


def test_scores_comparable_across_scales():
    # The same shape at scales a million apart must give the same score for the same relative event.
    t = timeline(9)
    base = daily_series(t, 1, seed=6)[0]
    values = np.vstack([base * 1e-3, base, base * 1e3])
    train, t_train, test, t_test = split(values, t, 8)
    test = test.copy()
    test[:, 50] += np.array([1e-3, 1.0, 1e3]) * 20
    scores = make_detector().fit(train, t_train).score(test, t_test).score
    assert np.allclose(scores[:, 50], scores[1, 50], rtol=1e-3)
    assert scores[1, 50] >= 2


def test_heavy_tailed_noise_calibrated():
    t = timeline(10)
    rng = np.random.default_rng(7)
    gaussian = 100 + rng.normal(0, 2, t.size)
    heavy = 100 + 2 * rng.standard_t(3, t.size)
    train, t_train, test, t_test = split(np.vstack([gaussian, heavy]), t, 8)
    scores = make_detector(seasonality="none").fit(train, t_train).score(test, t_test).score
    rate = np.mean(scores >= 1, axis=1)
    assert rate[0] < 0.01
    assert rate[1] < 0.02


@pytest.mark.parametrize("direction, sign, expect_alert", [
    ("up", +1, True), ("up", -1, False), ("down", -1, True), ("down", +1, False), ("both", -1, True),
])
def test_direction(direction, sign, expect_alert):
    t = timeline(5)
    values = daily_series(t, 1, seed=8)
    train, t_train, test, t_test = split(values, t, 4)
    test = test.copy()
    test[0, 20] += sign * 40
    scores = make_detector(direction=direction).fit(train, t_train).score(test, t_test).score
    assert bool(scores[0, 20] >= 2) is expect_alert
    assert scores[0, 20] >= 0


def test_level_drift_followed():
    # A slow ramp of 20 noise units per day is drift, not an anomaly.
    t = timeline(8)
    rng = np.random.default_rng(9)
    drift = 20 * 2.0 * (t - START) / DAY
    values = (500 + drift + rng.normal(0, 2, t.size))[None, :]
    train, t_train, test, t_test = split(values, t, 6)
    scores = make_detector(seasonality="none").fit(train, t_train).score(test, t_test).score
    assert np.mean(scores >= 1) < 0.02


def test_level_shift_keeps_alerting():
    t = timeline(5)
    values = daily_series(t, 1, seed=10)
    train, t_train, test, t_test = split(values, t, 4)
    test = test.copy()
    test[0, 100:] += 40
    scores = make_detector().fit(train, t_train).score(test, t_test).score
    # One hour after the shift it is still anomalous: the level tracker must not absorb it quickly.
    assert np.all(scores[0, 100:112] >= 2)


def test_nan_and_gaps():
    t = timeline(6)
    values = daily_series(t, 3, seed=11)
    values[0, 200:600] = np.nan
    values[1, ::3] = np.nan
    values[2, 10] = np.inf
    train, t_train, test, t_test = split(values, t, 5)
    test = test.copy()
    test[0, 5] = np.nan
    test[1, 40] += 30
    detector = make_detector().fit(train, t_train)
    assert np.all(detector.ready_)
    result = detector.score(test, t_test)
    assert np.isnan(result.score[0, 5])
    assert result.score[1, 40] >= 2
    finite = result.score[~np.isnan(test)]
    assert np.all(np.isfinite(finite))


def test_constant_series_quiet_then_alerts_on_change():
    t = timeline(3)
    values = np.full((1, t.size), 42.0)
    train, t_train, test, t_test = split(values, t, 2)
    test = test.copy()
    detector = make_detector().fit(train, t_train)
    quiet = detector.score(test[:, :50], t_test[:50]).score
    assert np.all(quiet == 0)
    test[0, 60] = 60.0
    changed = detector.score(test[:, 50:], t_test[50:]).score
    assert changed[0, 10] >= 2


def test_quantised_series_ignores_one_unit():
    # An integer count that is mostly 3 with rare 2s and 4s: one unit of change is resolution, not an anomaly.
    t = timeline(4)
    rng = np.random.default_rng(12)
    values = (3 + rng.choice([-1, 0, 0, 0, 0, 0, 0, 0, 1], size=t.size)).astype(float)[None, :]
    train, t_train, test, t_test = split(values, t, 3)
    test = test.copy()
    test[0, :] = 4.0
    test[0, 30] = 12.0
    scores = make_detector(seasonality="none").fit(train, t_train).score(test, t_test).score
    assert scores[0, 0] < 1
    assert scores[0, 30] >= 2


def test_flat_high_level_small_wiggle_quiet():
    t = timeline(3)
    rng = np.random.default_rng(13)
    values = (10_000 + rng.normal(0, 0.01, t.size))[None, :]
    train, t_train, test, t_test = split(values, t, 2)
    test = test.copy()
    test[0, 10] += 5.0
    scores = make_detector().fit(train, t_train).score(test, t_test).score
    assert scores[0, 10] < 1


def test_cold_start_not_ready():
    t = timeline(0.5)
    values = daily_series(t, 2, seed=14)
    values[1, :-10] = np.nan
    detector = make_detector(min_history="6h").fit(values, t)
    assert bool(detector.ready_[0]) is True
    assert bool(detector.ready_[1]) is False
    scores = detector.score(values[:, -5:], t[-5:] + 5 * STEP)
    assert np.all(np.isnan(scores.score[1]))
    assert np.all(np.isnan(scores.expected[1]))


def test_single_point_and_empty_series():
    t = timeline(2)
    values = np.full((2, t.size), np.nan)
    values[0, 100] = 7.0
    detector = make_detector().fit(values, t)
    assert not detector.ready_.any()
    result = detector.score(np.array([[7.0], [1.0]]), t[-1:] + STEP)
    assert np.all(np.isnan(result.score))


def test_single_column_panel():
    detector = make_detector(min_history="5m").fit(np.array([[1.0]]), np.array([START]))
    result = detector.score(np.array([[1.0]]), np.array([START + STEP]))
    assert result.score.shape == (1, 1)


def test_timezone_follows_local_clock():
    # A peak at 09:00 in New York is at 14:00 UTC in winter; fit in the local zone and the
    # profile must still match after the change to daylight saving time (8 March 2026).
    start = 1_772_323_200.0  # 2026-03-01 00:00 UTC
    t = start + np.arange(0, 14 * DAY, STEP)
    local_hour = ((t - 5 * 3600) % DAY) / 3600
    after_switch = t >= 1_772_953_200.0  # 2026-03-08 07:00 UTC, 03:00 EDT
    local_hour = np.where(after_switch, ((t - 4 * 3600) % DAY) / 3600, local_hour)
    rng = np.random.default_rng(15)
    values = (10 + 50 * np.exp(-((local_hour - 9) ** 2) / 2) + rng.normal(0, 1, t.size))[None, :]
    train, t_train, test, t_test = make_split_at(values, t, 1_772_841_600.0)  # fit up to 7 March
    local = make_detector(timezone="America/New_York").fit(train, t_train).score(test, t_test).score
    utc = make_detector(timezone="UTC").fit(train, t_train).score(test, t_test).score
    assert np.mean(local >= 1) < 0.01
    assert np.mean(utc >= 1) > 0.02


def make_split_at(values, t, boundary):
    cut = int(np.searchsorted(t, boundary))
    return values[:, :cut], t[:cut], values[:, cut:], t[cut:]


def test_rows_map_to_fitted_series():
    t = timeline(4)
    values = daily_series(t, 3, seed=16)
    values[1] *= 100
    train, t_train, test, t_test = split(values, t, 3)
    detector = make_detector().fit(train, t_train)
    reordered = detector.score(test[[2, 1], :10], t_test[:10], rows=np.array([2, 1])).expected
    fresh = make_detector().fit(train, t_train)
    direct = fresh.score(test[:, :10], t_test[:10]).expected
    assert np.allclose(reordered[0], direct[2])
    assert np.allclose(reordered[1], direct[1])


def test_state_round_trip_scores_same():
    t = timeline(4)
    values = daily_series(t, 4, seed=17)
    train, t_train, test, t_test = split(values, t, 3)
    original = make_detector().fit(train, t_train)
    arrays, meta = original.get_state()
    restored = make_detector().set_state({k: v.copy() for k, v in arrays.items()}, dict(meta))
    a = original.score(test, t_test).score
    b = restored.score(test, t_test).score
    assert np.allclose(a, b, equal_nan=True)


def test_invalid_panel_rejected():
    detector = make_detector()
    with pytest.raises(ValueError, match="2-D"):
        detector.fit(np.zeros(10), np.arange(10) * STEP)
    with pytest.raises(ValueError, match="one entry per column"):
        detector.fit(np.zeros((1, 10)), np.arange(9) * STEP)
    with pytest.raises(ValueError, match="grid"):
        detector.fit(np.zeros((1, 3)), np.array([0.0, STEP, 2.5 * STEP]))


def test_fine_step_night_band_fits_night_noise():
    # At a 10 s step the noise of every hour of the day must shape the band. When only the
    # newest 2016 columns (5.6 hours) set the noise scale, 9 % of clean night points here scored 1.
    step = 10.0
    t = START + np.arange(0, 3.5 * DAY, step)
    hours = (t % DAY) / 3600.0
    night = (hours < 6) | (hours >= 22)
    rng = np.random.default_rng(4)
    noise = np.where(night, 4.0, 1.0)
    values = (100.0 + 20.0 * ((hours >= 8) & (hours < 18)) + noise * rng.standard_normal((3, t.size)))
    cut = int(3 * DAY / step) - int(12 * 3600 / step)  # the fit ends at noon of the third day
    detector = SeasonalDetector(SeasonalParams(min_history="1d"), step=step)
    detector.fit(values[:, :cut], t[:cut])
    result = detector.score(values[:, cut:], t[cut:])
    scored_night = night[cut:]

    night_flags = result.score[:, scored_night] >= 1
    day_flags = result.score[:, ~scored_night] >= 1
    assert night_flags.mean() < 0.01
    assert day_flags.mean() < 0.01
    # A step of 10 night noise units is still found at night.
    shifted = values[:, cut:].copy()
    first_night = np.flatnonzero(scored_night)[:360]
    shifted[0, first_night] += 40.0
    detector.fit(values[:, :cut], t[:cut])
    found = detector.score(shifted, t[cut:]).score[0, first_night] >= 1
    assert found.mean() > 0.9
