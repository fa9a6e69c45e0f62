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

GROUPS = ("valve1", "valve2")
METHODS = ("limits", "autoencoder", "both")
LABEL_COLUMNS = ("anomaly", "changepoint")

# SKAB samples once a second.
STEP_SECONDS = 1.0

# The best published outlier-detection F1 on SKAB (Conv-AE and MSET), from SKAB's README.
PUBLISHED_BEST_F1 = 0.78

# Settings chosen before looking at the test rows: a 30 s window summarises the pump's cycle
# of a few seconds, and 5 minutes of the 400 training rows must have data.
DEFAULT_PARAMS = {"window": "30s", "min_history": "5m"}


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
        labels, flags, delays, fit_times = [], [], [], []
        for key in [run for run in runs if run.startswith(f"{group}/")]:
            truth, scores, fit_seconds = score_run(key, method, params)
            flagged = np.nan_to_num(scores, nan=0.0) >= 1.0
            labels.append(truth)
            flags.append(flagged)
            delays.extend(detection_delays(truth, flagged) * STEP_SECONDS)
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
            "fit_seconds": float(np.mean(fit_times)),
            "every_row_f1": point_metrics(truth, np.ones_like(flagged)).f1,
        }
    return results


def render(all_results: dict[str, dict[str, dict]], params: dict) -> str:
    lines = [
        "Command: `python -m bench.skab`. The equipment detector with "
        + ", ".join(f"`{key}: {value}`" for key, value in params.items())
        + " and every other parameter at its default. Each run is fitted on its first 400 rows and "
        "scored on the rest; a row is flagged at entity score >= 1. Point-wise metrics are pooled "
        "over every run of a group. The delay is the median over detected anomalies; detected "
        "counts runs whose anomaly has at least one flagged row.",
        "",
        f"Environment: {environment_line(('numpy', 'scipy', 'scikit-learn', 'tensorflow-cpu', 'keras'))}",
        "",
        "| method | group | runs | F1 | precision | recall | false-alarm rate | delay (s) | detected | fit (s per run) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, results in all_results.items():
        for group, row in results.items():
            lines.append(
                f"| {method} | {group} | {row['runs']} | {row['f1']:.3f} | {row['precision']:.3f} | {row['recall']:.3f} "
                f"| {row['false_alarm_rate']:.3f} | {row['delay_seconds']:.0f} | {row['detected']} | {row['fit_seconds']:.2f} |"
            )
    first = next(iter(all_results.values()))
    every_row = ", ".join(f"{group} {row['every_row_f1']:.3f}" for group, row in first.items())
    lines += [
        "",
        f"F1 of flagging every test row, the floor any useful method must beat: {every_row}. "
        "The anomalies cover more than half of the test rows, so a high recall alone earns most of the F1.",
        "",
        f"Published best F1 on SKAB: {PUBLISHED_BEST_F1:.2f} (Conv-AE and MSET, SKAB's leaderboard). That figure "
        "covers all of SKAB's groups, not only valve1 and valve2, so the comparison is indicative.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    parser.add_argument("--window", default=DEFAULT_PARAMS["window"], help="feature window, a duration such as 30s")
    parser.add_argument("--ewma-lambda", type=float, default=None, help="EWMA weight; 0 turns the drift chart off")
    parser.add_argument("--no-write", action="store_true", help="print the section without writing docs/benchmarks.md")
    args = parser.parse_args(argv)
    params = dict(DEFAULT_PARAMS, window=args.window)
    if args.ewma_lambda is not None:
        params["ewma_lambda"] = args.ewma_lambda or None
    all_results = {}
    for method in args.methods:
        all_results[method] = evaluate(method, params)
    body = render(all_results, params)
    print(body)
    if not args.no_write:
        path = write_section("skab", "SKAB: equipment detector", body)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
