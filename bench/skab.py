"""SKAB benchmark: the equipment detector on the valve1 and valve2 runs of the water-pump test bed.

Run from the repository root: ``python -m bench.skab`` (``--methods limits`` skips TensorFlow).
Writes the ``skab`` section of docs/benchmarks.md.

Protocol of SKAB's authors: each run is fitted on its first 400 rows (normal operation) and
scored on the rest. Each run is one entity with the 8 sensors as panel rows. The anomaly-free
run is never used, because parts of it reappear inside labelled runs. A row is flagged when the
entity score is at least 1 (the warning edge), a threshold fixed in advance rather than chosen
on the test labels. F1, precision and recall are point-wise and pooled over every run of a
group. The false-alarm rate is the share of normal test rows flagged. The detection delay is
the median, over a group's detected anomalies, of the seconds from the first anomalous row to
the first flagged one.
"""

import argparse
import time

import numpy as np

from bench.report import environment_line, write_section
from detectors.equipment import EquipmentDetector, EquipmentParams
from exporter.datasets import list_skab_runs, read_skab_run, split_skab_run
from exporter.evaluation import detection_delays, false_alarm_rate, point_metrics

# The labelled groups stored in the datasets folder. SKAB's "other" group is not among them.
GROUPS = ("valve1", "valve2")
METHODS = ("limits", "autoencoder", "both")
LABEL_COLUMNS = ("anomaly", "changepoint")

# SKAB samples once a second.
STEP_SECONDS = 1.0

# Outlier detection on the test rows only ("Strict Leaderboard" of SKAB's README), over all 34
# labelled runs of SKAB v0.9. The recall is 1 - MAR, and the README gives no precision.
PUBLISHED = (
    {"name": "Conv-AE", "f1": 0.78, "false_alarm_rate": 0.1355, "recall": 1 - 0.2802},
    {"name": "MSET", "f1": 0.78, "false_alarm_rate": 0.3973, "recall": 1 - 0.1413},
)

# Settings chosen before looking at the test rows: a 30 s window summarises the pump's cycle
# of a few seconds, and 5 minutes of the 400 training rows must have data.
DEFAULT_PARAMS = {"window": "30s", "min_history": "5m"}

# Calibration settings of the sensitivity table, around the defaults (0.25 and 0.05).
SENSITIVITY_SHARES = (0.2, 0.25, 0.33)
SENSITIVITY_RATES = (0.01, 0.05)


def score_run(key: str, method: str, params: dict) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit on the run's first 400 rows and score the rest; return (labels, entity scores, fit seconds)."""
    frame = read_skab_run(key)
    train, test = split_skab_run(frame)
    sensors = [column for column in frame.columns if column not in LABEL_COLUMNS]
    detector = EquipmentDetector(EquipmentParams(method=method, **params), step=STEP_SECONDS)
    train_values = train[sensors].to_numpy(dtype=np.float64).T
    test_values = test[sensors].to_numpy(dtype=np.float64).T
    # SKAB's clock has occasional skips; the rows are consecutive samples, so they get a regular grid.
    times = np.arange(len(frame), dtype=np.float64) * STEP_SECONDS
    started = time.perf_counter()
    detector.fit(train_values, times[: len(train)], entities=[key] * len(sensors), sensors=sensors)
    fit_seconds = time.perf_counter() - started
    result = detector.score(test_values, times[len(train) :])
    return test["anomaly"].to_numpy(dtype=np.int64), result.entity_score[0], fit_seconds


def evaluate(method: str, params: dict) -> dict[str, dict]:
    """Score every run of each group and pool the metrics per group."""
    runs = list_skab_runs()
    results = {}
    for group in GROUPS:
        labels, flags, delays, fit_times, missed = [], [], [], [], []
        for key in [run for run in runs if run.startswith(f"{group}/")]:
            truth, scores, fit_seconds = score_run(key, method, params)
            flagged = np.nan_to_num(scores, nan=0.0) >= 1.0
            labels.append(truth)
            flags.append(flagged)
            run_delays = detection_delays(truth, flagged) * STEP_SECONDS
            delays.extend(run_delays)
            if run_delays.size == 0:
                missed.append(key)
            fit_times.append(fit_seconds)
        truth, flagged = np.concatenate(labels), np.concatenate(flags)
        metrics = point_metrics(truth, flagged)
        results[group] = {
            "runs": len(labels),
            "f1": metrics.f1,
            "precision": metrics.precision,
            "recall": metrics.recall,
            "false_alarm_rate": false_alarm_rate(truth, flagged),
            "delay_seconds": float(np.median(delays)) if delays else float("nan"),
            "detected": f"{len(delays)}/{len(labels)}",
            "missed": missed,
            "fit_seconds": float(np.mean(fit_times)),
            "every_row_f1": point_metrics(truth, np.ones_like(flagged)).f1,
        }
    return results


def configurations(methods: list[str]) -> list[tuple[str, str, dict]]:
    """Return the rows of the main table: (label, method, parameters added to the defaults)."""
    rows = []
    for method in methods:
        rows.append((method, method, {}))
        if method == "limits":
            rows.append(("limits, calibration off", "limits", {"calibration_share": 0.0}))
    return rows


def sensitivity(params: dict) -> dict[tuple[float, float], dict[str, dict]]:
    """Evaluate the limits method for every pair of SENSITIVITY_SHARES and SENSITIVITY_RATES."""
    return {
        (share, rate): evaluate("limits", dict(params, calibration_share=share, false_alarm_rate=rate))
        for share in SENSITIVITY_SHARES
        for rate in SENSITIVITY_RATES
    }


def render(all_results: dict[str, dict[str, dict]], params: dict, grid: dict | None) -> str:
    defaults = EquipmentParams()
    lines = [
        "Command: `python -m bench.skab`. The equipment detector with "
        + ", ".join(f"`{key}: {value}`" for key, value in params.items())
        + " and every other parameter at its default (among them "
        f"`calibration_share: {defaults.calibration_share}` and `false_alarm_rate: {defaults.false_alarm_rate}`). "
        "Each run is fitted on its first 400 rows and scored on the rest, so calibration holds out "
        f"the newest {round(defaults.calibration_share * 400)} of the 400 rows. A row is flagged at "
        "entity score >= 1. Point-wise metrics are pooled over every run of a group. The delay is the "
        "median over detected anomalies; detected counts runs whose anomaly has at least one flagged row.",
        "",
        f"Environment: {environment_line(('numpy', 'scipy', 'scikit-learn', 'tensorflow-cpu', 'keras'))}",
        "",
        "| method | group | runs | F1 | precision | recall | false-alarm rate | delay (s) | detected | fit (s per run) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, results in all_results.items():
        for group, row in results.items():
            lines.append(
                f"| {label} | {group} | {row['runs']} | {row['f1']:.3f} | {row['precision']:.3f} | {row['recall']:.3f} "
                f"| {row['false_alarm_rate']:.3f} | {row['delay_seconds']:.0f} | {row['detected']} | {row['fit_seconds']:.2f} |"
            )
    for published in PUBLISHED:
        lines.append(
            f"| {published['name']}, published | all SKAB | 34 | {published['f1']:.2f} | – | {published['recall']:.2f} "
            f"| {published['false_alarm_rate']:.3f} | – | – | – |"
        )
    first = next(iter(all_results.values()))
    every_row = ", ".join(f"{group} {row['every_row_f1']:.3f}" for group, row in first.items())
    missed = [
        f"{label}: " + ", ".join(key for row in results.values() for key in row["missed"])
        for label, results in all_results.items()
        if any(row["missed"] for row in results.values())
    ]
    lines += [
        "",
        "Runs whose anomaly has no flagged row: " + ("; ".join(missed) if missed else "none") + ".",
        "",
        f"F1 of flagging every test row, the floor any useful method must beat: {every_row}. "
        "The anomalies cover more than half of the test rows, so a high recall alone earns most of the F1; "
        "the false-alarm rate shows what that recall costs.",
        "",
        "The published rows are the outlier-detection results on test rows only (the \"Strict Leaderboard\" "
        "of SKAB's README), with the recall as 1 - MAR. They cover all 34 labelled runs of SKAB v0.9, of which "
        "the datasets folder holds the 20 of valve1 and valve2, so the comparison is indicative.",
        "",
        "\"calibration off\" scores with the control limits as fitted (their spreads still widened for "
        "autocorrelation), whose edges assume that the training rows show the whole normal range. In "
        "these runs the temperatures and vibration levels wander beyond the 400 training rows, and "
        "calibration on held-out rows widens the edges for that. Its cost shows in runs whose held-out "
        "rows contain an excursion: one calibration factor per entity then widens the edge for every "
        "sensor. In valve1 run 12 the flow rate reads 32 or 33 in the first 300 rows and now and then 31 "
        "in the held-out 100. In run 2 the temperature starts to fall and the thermocouple to rise "
        "about 20 rows before row 400.",
        "",
        "With calibration, the autoencoder learns from the older 300 rows only, and its edges can only rise.",
    ]
    if grid:
        lines += [
            "",
            "### Calibration settings",
            "",
            "The limits method with other calibration settings; F1 / false-alarm rate per group. The "
            "defaults are not this table's best cell: 0.05 is close to the share of normal data beyond "
            "2 sigma, and 0.25 holds out a quarter of the window. The spread across the table is a rough "
            "measure of how much a difference between two settings can owe to chance in 20 runs.",
            "",
            "| calibration_share | false_alarm_rate | " + " | ".join(GROUPS) + " |",
            "|---|---|" + "---|" * len(GROUPS),
        ]
        for (share, rate), results in grid.items():
            cells = " | ".join(f"{results[group]['f1']:.3f} / {results[group]['false_alarm_rate']:.3f}" for group in GROUPS)
            lines.append(f"| {share} | {rate} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    parser.add_argument("--window", default=DEFAULT_PARAMS["window"], help="feature window, a duration such as 30s")
    parser.add_argument("--ewma-lambda", type=float, default=None, help="EWMA weight; 0 turns the drift chart off")
    parser.add_argument("--no-sensitivity", action="store_true", help="skip the table of calibration settings")
    parser.add_argument("--no-write", action="store_true", help="print the section without writing docs/benchmarks.md")
    args = parser.parse_args(argv)
    params = dict(DEFAULT_PARAMS, window=args.window)
    if args.ewma_lambda is not None:
        params["ewma_lambda"] = args.ewma_lambda or None
    all_results = {}
    for label, method, extra in configurations(args.methods):
        all_results[label] = evaluate(method, dict(params, **extra))
    grid = None if args.no_sensitivity else sensitivity(params)
    body = render(all_results, params, grid)
    print(body)
    if not args.no_write:
        path = write_section("skab", "SKAB: equipment detector", body)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
