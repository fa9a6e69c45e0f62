"""Smoke tests of the small helpers behind the benchmark commands in bench/."""

import argparse

import numpy as np

from bench import baselines, fine_step, smd, speed

DAY = 86400.0
STEP = 300.0


def settings(**overrides):
    values = {"fit_every_seconds": DAY, "fit_window_seconds": 14 * DAY, "min_history_seconds": DAY}
    values.update(overrides)
    return argparse.Namespace(**values)


def daily_series(days: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    times = 1704067200.0 + STEP * np.arange(int(days * DAY / STEP))
    values = 10 + np.sin(2 * np.pi * times / DAY) + rng.normal(0, 0.1, times.size)
    return times, values


def test_lag_features_layout():
    features = baselines.lag_features(np.array([1.0, 2.0, 3.0, 4.0]), 3)
    assert np.isnan(features[:2]).any(axis=1).all()
    np.testing.assert_array_equal(features[2], [3.0, 2.0, 1.0])
    np.testing.assert_array_equal(features[3], [4.0, 3.0, 2.0])


def test_refit_times_start_after_min_history():
    times = np.arange(0.0, 3 * DAY, STEP)
    fits = baselines.refit_times(times, DAY, DAY)
    np.testing.assert_array_equal(fits, [DAY, 2 * DAY])
    assert baselines.refit_times(times[:10], DAY, DAY).size == 0


def test_zscore_flags_spike_in_file_order():
    times, values = daily_series(3)
    values[500] += 5.0
    # Reverse the rows: scores must come back in file order, still computed in time order.
    scores, timing = baselines.zscore_scores(times[::-1], values[::-1], settings())
    scores = scores[::-1]
    assert np.argmax(scores) == 500
    assert scores[500] > 1
    assert np.all(np.isfinite(scores))
    assert timing.points == times.size


def test_zscore_constant_series_is_finite():
    times = 1704067200.0 + STEP * np.arange(400)
    scores, _ = baselines.zscore_scores(times, np.full(400, 7.0), settings())
    assert np.all(scores == 0)


def test_forest_scores_only_after_first_fit():
    times, values = daily_series(3)
    scores, timing = baselines.forest_scores(times, values, settings())
    first_fit = times[0] + DAY
    assert np.all(scores[times <= first_fit] == 0)
    assert np.all(scores[times > first_fit + STEP * baselines.FOREST_LAGS] > 0)
    assert timing.series_fits == 2


def test_entity_score_ignores_nan():
    columns = np.array([[0.5, np.nan, np.nan], [2.0, 0.1, np.nan]])
    result = smd.entity_score(columns)
    np.testing.assert_array_equal(result[:2], [2.0, 0.1])
    assert np.isnan(result[2])


def test_composite_f1_one_long_run_not_perfect():
    labels = np.zeros(100, dtype=bool)
    labels[10:12] = True
    labels[50:52] = True
    everything = np.ones(100, dtype=bool)
    assert smd.composite_f1(labels, everything) < 0.1
    exact = labels.copy()
    assert smd.composite_f1(labels, exact) == 1.0


def test_synthetic_panel_shape_and_dtype():
    panel = speed.synthetic_panel(7, 50)
    assert panel.shape == (7, 50)
    assert panel.dtype == np.float32
    assert np.all(np.isfinite(panel))


def test_fine_step_section_rows():
    result = fine_step.run_fit(20)
    assert result["series"] == 20
    assert result["ready"] == 20
    assert result["max_rss"] >= result["data_rss"] > 0
    body = fine_step.section([result, {"series": 3000, "error": "timed out after 1800 s"}])
    assert "| 20 | " in body
    assert "| 3,000 | failed: timed out after 1800 s |" in body
