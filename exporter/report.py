"""Outputs of a backtest: per-point scores as CSV or Parquet, OpenMetrics for backfill, an HTML report."""

import html
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from exporter.backtest import BacktestResult
from exporter.evaluation import detection_delays, event_metrics, point_metrics

OUTPUT_FAMILIES = (
    ("anomaly_score", "score"),
    ("anomaly_expected", "expected"),
    ("anomaly_lower", "lower"),
    ("anomaly_upper", "upper"),
)


def scores_frame(results: list[BacktestResult], static_labels: dict[str, dict[str, str]] | None = None) -> pd.DataFrame:
    """Return one row per series and scored time: timestamp, detector, entity, labels (JSON), value and results."""
    frames = []
    for result in results:
        for row, labels in enumerate(result.labels):
            scored = ~np.isnan(result.score[row])
            if not scored.any():
                continue
            frames.append(pd.DataFrame({
                "timestamp": pd.to_datetime(result.timestamps[scored], unit="s", utc=True),
                "detector": result.detector,
                "entity": result.entities[row],
                "labels": json.dumps(labels, sort_keys=True),
                "value": result.values[row, scored],
                "score": result.score[row, scored],
                "expected": result.expected[row, scored],
                "lower": result.lower[row, scored],
                "upper": result.upper[row, scored],
            }))
    columns = ["timestamp", "detector", "entity", "labels", "value", "score", "expected", "lower", "upper"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def write_scores(frame: pd.DataFrame, path: Path) -> Path:
    """Write the scores as CSV, or as Parquet when ``path`` ends with .parquet."""
    if path.suffix == ".parquet":
        try:
            frame.to_parquet(path, index=False)
        except ImportError:
            raise SystemExit("Parquet output needs pyarrow: pip install 'anomaly-exporter[report]', or use --format csv") from None
    else:
        frame.to_csv(path, index=False, float_format="%.6g")
    return path


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def write_openmetrics(results: list[BacktestResult], output_labels, path: Path) -> Path:
    """Write the results as OpenMetrics text for ``promtool tsdb create-blocks-from openmetrics``.

    ``output_labels(result, row)`` returns the label set a live exporter would expose.
    """
    with open(path, "w", encoding="utf-8") as handle:
        for family, attribute in OUTPUT_FAMILIES:
            handle.write(f"# TYPE {family} gauge\n")
            for result in results:
                array = getattr(result, attribute)
                for row in range(len(result.labels)):
                    labels = output_labels(result, row)
                    text = ",".join(f'{name}="{_escape(value)}"' for name, value in sorted(labels.items()))
                    scored = ~np.isnan(result.score[row])
                    for timestamp, value in zip(result.timestamps[scored], array[row, scored]):
                        handle.write(f"{family}{{{text}}} {value:.6g} {int(timestamp)}\n")
        handle.write("# EOF\n")
    return path


def windows_for(labels: dict[str, str], entity: str, windows: dict[str, list]) -> list[tuple[float, float]]:
    """Find the labelled windows of a series by entity, by the ``series`` label, or by file stem."""
    for key in (entity, labels.get("series"), labels.get("column")):
        if key is not None and key in windows:
            return windows[key]
    series = labels.get("series")
    for key, spans in windows.items():
        if series is not None and Path(key).stem == series:
            return spans
    return []


def load_windows(path: Path) -> dict[str, list[tuple[float, float]]]:
    """Read labelled windows: JSON mapping a series name to ``[[start, end], ...]`` (times as text or unix seconds)."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object mapping series names to lists of [start, end]")
    windows = {}
    for name, spans in raw.items():
        try:
            windows[name] = [(_to_seconds(start), _to_seconds(end)) for start, end in spans]
        except (TypeError, ValueError):
            raise ValueError(
                f"{path}: the windows of {name!r} are {spans!r}; expected a list of [start, end] pairs "
                "of times such as \"2014-02-08 14:30:00\" or Unix seconds"
            ) from None
    return windows


def _to_seconds(value) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return stamp.timestamp()


def series_summary(result: BacktestResult, row: int, spans: list[tuple[float, float]]) -> dict:
    """Summarise one series: points scored, maximum score, warning and critical shares, and quality when labelled."""
    score = result.score[row]
    scored = ~np.isnan(score)
    summary = {
        "detector": result.detector,
        "entity": result.entities[row],
        "points": int(scored.sum()),
        "max_score": float(np.nanmax(score)) if scored.any() else math.nan,
        "warning_share": float(np.mean(score[scored] >= 1)) if scored.any() else math.nan,
        "critical_share": float(np.mean(score[scored] >= 2)) if scored.any() else math.nan,
    }
    if spans and scored.any():
        labels = np.zeros(score.size, dtype=bool)
        for start, end in spans:
            labels |= (result.timestamps >= start) & (result.timestamps <= end)
        flags = np.nan_to_num(score, nan=0.0) >= 1
        points = point_metrics(labels[scored], flags[scored])
        events = event_metrics(labels[scored], flags[scored])
        delays = detection_delays(labels[scored], flags[scored], result.timestamps[scored])
        summary.update({
            "labelled_events": events.events,
            "detected_events": events.detected_events,
            "event_precision": events.precision,
            "point_f1": points.f1,
            "median_delay_seconds": float(np.median(delays)) if len(delays) else math.nan,
        })
    return summary


def plot_series(result: BacktestResult, row: int, spans, path: Path) -> Path:
    """Draw the series with its band and the score with the warning and critical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = pd.to_datetime(result.timestamps, unit="s", utc=True)
    # Baseline and band only where there was data, so a series that ended does not trail a band.
    observed = ~np.isnan(result.values[row])
    expected = np.where(observed, result.expected[row], np.nan)
    lower = np.where(observed, result.lower[row], np.nan)
    upper = np.where(observed, result.upper[row], np.nan)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 4.8), sharex=True, height_ratios=[2, 1])
    top.fill_between(times, lower, upper, color="tab:blue", alpha=0.18, label="band (score < 1)")
    top.plot(times, expected, color="tab:blue", linewidth=0.8, label="expected")
    top.plot(times, result.values[row], color="black", linewidth=0.6, label="observed")
    bottom.plot(times, result.score[row], color="tab:purple", linewidth=0.7, label="anomaly_score")
    bottom.axhline(1, color="tab:orange", linewidth=0.8, linestyle="--", label="warning")
    bottom.axhline(2, color="tab:red", linewidth=0.8, linestyle="--", label="critical")
    for start, end in spans:
        for axis in (top, bottom):
            axis.axvspan(pd.to_datetime(start, unit="s", utc=True), pd.to_datetime(end, unit="s", utc=True),
                         color="tab:red", alpha=0.12)
    top.set_title(f"{result.detector}: {result.entities[row]}", fontsize=10)
    top.legend(loc="upper left", fontsize=7, ncols=3)
    bottom.legend(loc="upper left", fontsize=7, ncols=3)
    bottom.set_ylim(0, max(3.0, min(10.0, float(np.nanmax(result.score[row])) if np.isfinite(result.score[row]).any() else 3.0)))
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def write_html(results: list[BacktestResult], windows: dict, folder: Path, max_plots: int, title: str) -> Path:
    """Write report.html with a summary table and one plot per series (the highest scores first)."""
    summaries, plots = [], []
    for result in results:
        for row, labels in enumerate(result.labels):
            spans = windows_for(labels, result.entities[row], windows)
            summaries.append((series_summary(result, row, spans), result, row, spans))
    summaries.sort(key=lambda item: -np.nan_to_num(item[0]["max_score"], nan=-1))
    for number, (summary, result, row, spans) in enumerate(summaries[:max_plots]):
        name = f"plot-{number:03d}.png"
        plot_series(result, row, spans, folder / name)
        plots.append((summary, name))

    frame = pd.DataFrame([item[0] for item in summaries])
    table = frame.to_html(index=False, float_format=lambda x: f"{x:.3g}", na_rep="", border=0)
    figures = "\n".join(
        f'<h3>{html.escape(s["detector"])}: {html.escape(s["entity"])}</h3><img src="{name}" alt="plot of {html.escape(s["entity"])}">'
        for s, name in plots
    )
    omitted = len(summaries) - len(plots)
    note = f"<p>{omitted} more series are in the table but not plotted (--max-plots).</p>" if omitted > 0 else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}} img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Score 1 is the band edge (warning) and 2 the critical edge. Shares count scored points;
labelled quality uses score &ge; 1 as a detection. Shaded red spans are labelled windows.</p>
{table}
{note}
{figures}
</body></html>
"""
    path = folder / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
