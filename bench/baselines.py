"""Baselines next to the seasonal detector on NAB: windowed z-score, IsolationForest and Prophet.

Run from the repository root: ``python -m bench.baselines``. Writes the ``baselines`` section
of docs/benchmarks.md. Prophet comes from the optional ``bench`` extra; when it does not import,
this command installs the extra with pip first (``--no-prophet`` skips Prophet instead).

Every detector streams over the same NAB files in the same run: each row's score uses only rows
before it (and, for the z-score, the row itself against the window before it). The seasonal
detector goes through bench.nab's replay. Each baseline is a function that turns one file's
(times, values) into one score per row. It handles the rows in time order and returns the scores
in file order, because NAB scores rows as they appear in the file.
"""

import argparse
import importlib
import logging
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.nab import ONSET_QUIET_SECONDS, PROFILES, file_step, load_files, onsets, score_group
from bench.report import ROOT, environment_line, write_section
from exporter.datasets import nab_corpus, read_nab_profiles
from exporter.durations import parse_duration
from exporter.evaluation import nab_optimize_threshold, nab_score

DAY = 86400.0

# Scores are capped like the seasonal detector's, so a zero spread cannot give +inf, which
# NAB's scorer rejects.
MAX_SCORE = 100.0

ZSCORE_WINDOW = "1D"
ZSCORE_MIN_ROWS = 12

FOREST_LAGS = 6
FOREST_TREES = 100

# Prophet's default interval width (prophet 1.x), written out so the report can state it.
PROPHET_INTERVAL_WIDTH = 0.8

# Alert onsets are scored at this many quantiles of each detector's scores, from the 90th to
# the 99.99th percentile, because the detectors' score scales differ.
ONSET_QUANTILES = np.linspace(0.9, 0.9999, 60)

# Files that Prophet runs on by default: every PROPHET_STRIDE-th NAB file in sorted order.
PROPHET_STRIDE = 6


@dataclass
class Timing:
    """Time spent fitting and scoring, with the counts to turn it into per-series figures."""

    fit_seconds: float = 0.0
    series_fits: int = 0
    """Fits of one series; a panel fit of n series counts n."""
    score_seconds: float = 0.0
    points: int = 0
    """Points scored."""

    def add(self, other: "Timing") -> None:
        self.fit_seconds += other.fit_seconds
        self.series_fits += other.series_fits
        self.score_seconds += other.score_seconds
        self.points += other.points


def in_time_order(times: np.ndarray, values: np.ndarray):
    """Return (order, sorted times, sorted values); ``scores[order] = sorted_scores`` restores file order."""
    order = np.argsort(times, kind="stable")
    return order, times[order], values[order]


def refit_times(times: np.ndarray, fit_every: float, min_history: float) -> np.ndarray:
    """Fit times from ``min_history`` after the first row to the last row, every ``fit_every``."""
    first = times[0] + min_history
    if first > times[-1]:
        return np.empty(0)
    return np.arange(first, times[-1], fit_every)


# --- windowed Gaussian z-score -------------------------------------------------------------------


def zscore_scores(times: np.ndarray, values: np.ndarray, settings) -> tuple[np.ndarray, Timing]:
    """Score each row by |z| / 3 against the mean and standard deviation of the trailing window."""
    began = time.perf_counter()
    order, sorted_times, sorted_values = in_time_order(times, values)
    index = pd.to_datetime(sorted_times, unit="s")
    series = pd.Series(sorted_values, index=index)
    # closed="left" leaves the row itself out of its own window.
    window = series.rolling(ZSCORE_WINDOW, closed="left", min_periods=ZSCORE_MIN_ROWS)
    mean = window.mean().to_numpy()
    std = window.std().to_numpy()
    deviation = np.abs(sorted_values - mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(deviation == 0, 0.0, deviation / std)
    sorted_scores = np.clip(np.nan_to_num(z / 3.0, nan=0.0, posinf=MAX_SCORE), 0.0, MAX_SCORE)
    scores = np.empty_like(sorted_scores)
    scores[order] = sorted_scores
    elapsed = time.perf_counter() - began
    # Rolling statistics have no separate fit, so the whole time counts as scoring.
    return scores, Timing(score_seconds=elapsed, points=values.size)


# --- IsolationForest on lagged values ------------------------------------------------------------


def lag_features(values: np.ndarray, lags: int) -> np.ndarray:
    """Rows of the current value and the ``lags - 1`` before it; rows without a full history are NaN."""
    features = np.full((values.size, lags), np.nan)
    for lag in range(lags):
        features[lag:, lag] = values[: values.size - lag]
    return features


def forest_scores(times: np.ndarray, values: np.ndarray, settings) -> tuple[np.ndarray, Timing]:
    """Refit an IsolationForest every ``fit_every`` on the trailing window; score rows until the next fit."""
    from sklearn.ensemble import IsolationForest

    order, sorted_times, sorted_values = in_time_order(times, values)
    features = lag_features(np.nan_to_num(sorted_values), FOREST_LAGS)
    complete = ~np.isnan(features).any(axis=1)
    sorted_scores = np.zeros(values.size)
    timing = Timing()
    for fitted_at in refit_times(sorted_times, settings.fit_every_seconds, settings.min_history_seconds):
        train = complete & (sorted_times > fitted_at - settings.fit_window_seconds) & (sorted_times <= fitted_at)
        scored = complete & (sorted_times > fitted_at) & (sorted_times <= fitted_at + settings.fit_every_seconds)
        if not train.any() or not scored.any():
            continue
        began = time.perf_counter()
        forest = IsolationForest(n_estimators=FOREST_TREES, random_state=0, n_jobs=1).fit(features[train])
        timing.fit_seconds += time.perf_counter() - began
        timing.series_fits += 1
        began = time.perf_counter()
        # score_samples is higher for normal rows; its negation is higher for anomalies.
        sorted_scores[scored] = -forest.score_samples(features[scored])
        timing.score_seconds += time.perf_counter() - began
        timing.points += int(np.count_nonzero(scored))
    scores = np.empty_like(sorted_scores)
    scores[order] = sorted_scores
    return scores, timing


# --- Prophet -------------------------------------------------------------------------------------


def prophet_scores(times: np.ndarray, values: np.ndarray, settings) -> tuple[np.ndarray, Timing]:
    """Refit Prophet every ``fit_every`` on the trailing window and score rows outside its interval.

    A row inside [yhat_lower, yhat_upper] scores 0. Outside, the score is its distance from the
    nearer edge divided by the interval's half-width, so 1 is one half-width beyond the edge.
    """
    from prophet import Prophet

    order, sorted_times, sorted_values = in_time_order(times, values)
    stamps = pd.to_datetime(sorted_times, unit="s")
    sorted_scores = np.zeros(values.size)
    timing = Timing()
    for fitted_at in refit_times(sorted_times, settings.fit_every_seconds, settings.min_history_seconds):
        train = (sorted_times > fitted_at - settings.fit_window_seconds) & (sorted_times <= fitted_at)
        train &= ~np.isnan(sorted_values)
        scored = (sorted_times > fitted_at) & (sorted_times <= fitted_at + settings.fit_every_seconds)
        if np.count_nonzero(train) < 2 or not scored.any():
            continue
        began = time.perf_counter()
        model = Prophet(daily_seasonality=True, weekly_seasonality=True, yearly_seasonality=False,
                        interval_width=PROPHET_INTERVAL_WIDTH)
        model.fit(pd.DataFrame({"ds": stamps[train], "y": sorted_values[train]}))
        timing.fit_seconds += time.perf_counter() - began
        timing.series_fits += 1
        began = time.perf_counter()
        forecast = model.predict(pd.DataFrame({"ds": stamps[scored]}))
        lower = forecast["yhat_lower"].to_numpy()
        upper = forecast["yhat_upper"].to_numpy()
        observed = sorted_values[scored]
        outside = np.maximum(observed - upper, lower - observed)
        half_width = np.maximum((upper - lower) / 2.0, 1e-12)
        sorted_scores[scored] = np.clip(np.nan_to_num(np.maximum(outside, 0.0) / half_width), 0.0, MAX_SCORE)
        timing.score_seconds += time.perf_counter() - began
        timing.points += int(np.count_nonzero(scored))
    scores = np.empty_like(sorted_scores)
    scores[order] = sorted_scores
    return scores, timing


def ensure_prophet() -> bool:
    """Import prophet, installing the ``bench`` extra with pip when it is missing; False if that fails."""
    try:
        importlib.import_module("prophet")
        return True
    except ImportError:
        pass
    command = [sys.executable, "-m", "pip", "install", "-e", f"{ROOT}[bench]"]
    print(f"prophet is not installed; installing the bench extra: {' '.join(command)}", flush=True)
    if subprocess.run(command, check=False).returncode != 0:
        print(f"installing prophet failed; run `pip install -e '.[bench]'` in {ROOT}, or pass --no-prophet",
              file=sys.stderr)
        return False
    importlib.invalidate_caches()
    try:
        importlib.import_module("prophet")
    except ImportError as error:
        print(f"prophet still does not import after the install: {error}", file=sys.stderr)
        return False
    return True


# --- the run -------------------------------------------------------------------------------------


def run_seasonal(files: dict, settings) -> tuple[dict, Timing]:
    groups: dict[float, list[str]] = {}
    for key, (times, _) in files.items():
        groups.setdefault(file_step(times), []).append(key)
    scores, timing = {}, Timing()
    for step, keys in sorted(groups.items()):
        group_scores, group_timing = score_group(keys, files, step, settings)
        scores.update(group_scores)
        timing.add(Timing(fit_seconds=group_timing["fit_seconds"], series_fits=group_timing["fits"] * len(keys),
                          score_seconds=group_timing["score_seconds"], points=group_timing["points"]))
    return scores, timing


def run_baseline(function, files: dict, keys: list[str], settings, name: str) -> tuple[dict, Timing]:
    scores, timing = {}, Timing()
    began = time.monotonic()
    for number, key in enumerate(keys, start=1):
        times, values = files[key]
        scores[key], file_timing = function(times, values, settings)
        timing.add(file_timing)
        if number % 10 == 0 or number == len(keys):
            print(f"{name}: {number}/{len(keys)} files, {time.monotonic() - began:.0f}s", flush=True)
    return scores, timing


def nab_results(scores: dict, keys: list[str], profiles: dict) -> dict:
    corpus = nab_corpus({key: scores[key] for key in keys})
    return {name: nab_optimize_threshold(corpus, profiles[name]) for name in PROFILES}


def onset_results(scores: dict, files: dict, keys: list[str], profiles: dict) -> dict:
    """Return profile -> (best NAB score, θ) when only alert onsets count, as in bench.nab."""
    pooled = np.concatenate([scores[key] for key in keys])
    thresholds = np.unique(np.quantile(pooled, ONSET_QUANTILES))
    best = {name: (-np.inf, float("nan")) for name in PROFILES}
    for threshold in thresholds:
        corpus = nab_corpus({key: onsets(scores[key], files[key][0], threshold) for key in keys})
        for name in PROFILES:
            value = nab_score(corpus, profiles[name], 0.5).normalized_score
            if value > best[name][0]:
                best[name] = (value, float(threshold))
    return best


def run(settings, with_prophet: bool) -> dict:
    files = load_files()
    all_keys = sorted(files)
    subset = all_keys[::PROPHET_STRIDE][: settings.prophet_files]
    profiles = read_nab_profiles()

    scores, timings = {}, {}
    began = time.monotonic()
    scores["seasonal"], timings["seasonal"] = run_seasonal(files, settings)
    print(f"seasonal: {time.monotonic() - began:.0f}s", flush=True)
    scores["z-score"], timings["z-score"] = run_baseline(zscore_scores, files, all_keys, settings, "z-score")
    scores["IsolationForest"], timings["IsolationForest"] = run_baseline(forest_scores, files, all_keys, settings,
                                                                         "IsolationForest")
    if with_prophet:
        logging.getLogger("cmdstanpy").setLevel(logging.WARNING)
        logging.getLogger("prophet").setLevel(logging.WARNING)
        scores["Prophet"], timings["Prophet"] = run_baseline(prophet_scores, files, subset, settings, "Prophet")

    full = {name: nab_results(scores[name], all_keys, profiles) for name in scores if name != "Prophet"}
    on_subset = {name: nab_results(scores[name], subset, profiles) for name in scores}
    full_onsets = {name: onset_results(scores[name], files, all_keys, profiles) for name in scores if name != "Prophet"}
    subset_onsets = {name: onset_results(scores[name], files, subset, profiles) for name in scores}
    return {"full": full, "subset": on_subset, "full_onsets": full_onsets, "subset_onsets": subset_onsets,
            "subset_keys": subset, "timings": timings, "files": len(all_keys)}


def nab_table(results: dict) -> str:
    table = "| detector | standard | reward low FP | reward low FN |\n|---|---|---|---|\n"
    for name, by_profile in results.items():
        cells = " | ".join(f"{by_profile[p].normalized_score:.1f} (θ {by_profile[p].threshold:.3g})" for p in PROFILES)
        table += f"| {name} | {cells} |\n"
    return table


def onset_table(results: dict) -> str:
    table = "| detector | standard | reward low FP | reward low FN |\n|---|---|---|---|\n"
    for name, by_profile in results.items():
        cells = " | ".join(f"{by_profile[p][0]:.1f} (θ {by_profile[p][1]:.3g})" for p in PROFILES)
        table += f"| {name} | {cells} |\n"
    return table


def speed_table(timings: dict) -> str:
    seasonal = timings["seasonal"]
    seasonal_fit = seasonal.fit_seconds / max(seasonal.series_fits, 1)
    seasonal_point = seasonal.score_seconds / max(seasonal.points, 1)
    table = ("| detector | series fits | fit per series (ms) | x seasonal | points scored | score per point (µs) "
             "| x seasonal | total (s) |\n|---|---|---|---|---|---|---|---|\n")
    for name, timing in timings.items():
        total = timing.fit_seconds + timing.score_seconds
        point = timing.score_seconds / max(timing.points, 1)
        if timing.series_fits:
            fit = timing.fit_seconds / timing.series_fits
            fit_cells = f"{timing.series_fits:,} | {1000 * fit:.2f} | {fit / seasonal_fit:,.0f}"
        else:
            fit_cells = "none | | "
        table += (f"| {name} | {fit_cells} | {timing.points:,} | {1e6 * point:.1f} | {point / seasonal_point:,.1f} | "
                  f"{total:.1f} |\n")
    return table


def render(outcome: dict, settings, command: str) -> str:
    subset = outcome["subset_keys"]
    prophet_ran = "Prophet" in outcome["timings"]
    prophet_line = (
        f"Prophet ran on {len(subset)} of the {outcome['files']} files (every {PROPHET_STRIDE}th in sorted order): "
        + ", ".join(f"`{key}`" for key in subset) + "."
        if prophet_ran else "Prophet did not run (`--no-prophet`)."
    )
    return f"""
Command: `{command}`. {environment_line(("numpy", "pandas", "scikit-learn", "prophet", "cmdstanpy"))}.
One process on 2 cores shared with other jobs.

All detectors see the same NAB files in the same run, stream over them, and refit every
`{settings.fit_every}` on the trailing `{settings.fit_window}` once a series has
`{settings.min_history}` of data; rows before the first fit score 0.
- **seasonal**: `SeasonalDetector` with default parameters through `exporter.backtest.replay`,
  exactly as `python -m bench.nab --fit-every {settings.fit_every}` runs it. That section's
  default refits every hour, so its figures differ from these.
- **z-score**: mean and standard deviation of the trailing {ZSCORE_WINDOW.replace("1D", "day")} of rows
  before each row (pandas rolling, at least {ZSCORE_MIN_ROWS} rows); score = |z| / 3, so 1 is 3 σ.
  It has no fit step.
- **IsolationForest**: scikit-learn, {FOREST_TREES} trees, one forest per series on the
  current value and the {FOREST_LAGS - 1} values before it (by row); score = the negated
  `score_samples`.
- **Prophet**: one model per series with daily and weekly seasonality and an {PROPHET_INTERVAL_WIDTH:.0%}
  interval (Prophet's default width). This is the approach of the Prometheus Anomaly Detector
  project: flag rows outside [yhat_lower, yhat_upper]. Score = the distance outside the interval
  divided by its half-width, 0 inside. No seed is set, and Prophet draws random uncertainty
  samples for its interval, so its figures change somewhat from run to run.

NAB score per profile (0 = flags nothing, 100 = perfect), with two readings of each score as in
the NAB section:
- *every row*: each row at or above θ is a detection. θ per detector and profile from NAB's
  exhaustive sweep (`nab_optimize_threshold`).
- *alert onsets*: only the first row at or above θ after {ONSET_QUIET_SECONDS / 3600:g} hours without
  one is a detection, as an alert notification would be. θ per detector and profile is the best
  of {ONSET_QUANTILES.size} quantiles (90th to 99.99th percentile) of that detector's scores,
  because the detectors' score scales differ.

All {outcome['files']} files, every row:

{nab_table(outcome["full"])}
All {outcome['files']} files, alert onsets:

{onset_table(outcome["full_onsets"])}
{prophet_line} The same subset for every detector, every row:

{nab_table(outcome["subset"])}
The same subset, alert onsets:

{onset_table(outcome["subset_onsets"])}
Speed, from the same run. Fit time per series is the time of one fit divided by the series it
covers (the seasonal detector fits every file of the same step in one panel). Score time per
point is the scoring time divided by the points scored; the seasonal detector's points are its
grid points, for the other detectors NAB rows. Prophet's rows cover only its subset, and its
scoring time includes `predict` with Prophet's default 1,000 uncertainty samples. The seasonal
panel's grid spans every file of its step, so its series fits and points count cells without
data too: per actual NAB row and per fit with data its costs are up to about 3 times higher,
and the ratios below flatter it by up to that much.

{speed_table(outcome["timings"])}"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__.splitlines()[0])
    parser.add_argument("--fit-every", default="1d", help="refit interval for every detector (default 1d)")
    parser.add_argument("--fit-window", default="14d", help="history per fit (default 14d)")
    parser.add_argument("--min-history", default="1d", help="history a series needs before its first fit (default 1d)")
    parser.add_argument("--prophet-files", type=int, default=10,
                        help=f"files for Prophet, every {PROPHET_STRIDE}th in sorted order (default 10)")
    parser.add_argument("--no-prophet", action="store_true", help="skip Prophet instead of installing it")
    parser.add_argument("--no-write", action="store_true", help="print the results without touching docs/benchmarks.md")
    args = parser.parse_args(argv)

    with_prophet = not args.no_prophet and ensure_prophet()
    if not args.no_prophet and not with_prophet:
        return 2
    settings = argparse.Namespace(
        fit_every=args.fit_every, fit_window=args.fit_window, min_history=args.min_history, params={},
        fit_every_seconds=parse_duration(args.fit_every), fit_window_seconds=parse_duration(args.fit_window),
        min_history_seconds=parse_duration(args.min_history), prophet_files=args.prophet_files,
    )
    outcome = run(settings, with_prophet)
    body = render(outcome, settings, "python -m bench.baselines" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv)))
    if args.no_write:
        print(body)
    else:
        write_section("baselines", "Baselines on NAB: z-score, IsolationForest, Prophet", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
