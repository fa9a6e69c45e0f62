"""Replay a time range through a detector exactly as the live scheduler would run it.

The replay refits at the same cadence as ``fit_every`` on the same ``fit_window``, and
between two fits it scores every new point in time order with the current model, so the
score of a point only uses data before it. The whole range is read with one (chunked)
query; each fit and score then works on a slice of that panel.
"""

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry

from exporter.config import DetectorConfig
from exporter.job import DetectorJob
from exporter.metrics import SelfMetrics
from exporter.store import StateStore

log = logging.getLogger(__name__)


@dataclass
class BacktestResult:
    """Per-point results of one detector over the replayed range; arrays are (series, time)."""

    detector: str
    labels: list[dict[str, str]]
    entities: list[str]
    timestamps: np.ndarray
    values: np.ndarray
    score: np.ndarray
    expected: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    fit_seconds: list[float] = field(default_factory=list)
    score_seconds: float = 0.0

    @property
    def fits(self) -> int:
        return len(self.fit_seconds)


def fit_times(start: float, end: float, fit_every: float) -> np.ndarray:
    """Return the times at which the live scheduler would fit between ``start`` and ``end``."""
    count = max(1, int(math.ceil((end - start) / fit_every)))
    return start + fit_every * np.arange(count)


def replay(config: DetectorConfig, source, start: float, end: float, progress=None) -> BacktestResult:
    """Replay ``[start, end]`` for one detector; ``progress`` is called with the share done (0 to 1)."""
    step = config.step
    start = math.ceil(start / step) * step
    end = math.floor(end / step) * step
    if end <= start:
        raise ValueError(f"the range to replay is shorter than one step ({step:g}s)")

    # The job turns the query result into a panel exactly as in live runs (counters,
    # entity labels, max_series), without touching the exporter's own metrics.
    job = DetectorJob(config, source, StateStore(None), SelfMetrics(CollectorRegistry()))
    panel = job.query(start - config.fit_window, end, "fit")
    times = panel.timestamps
    replayed = times > start - step / 2
    shape = (len(panel.labels), int(np.count_nonzero(replayed)))
    result = BacktestResult(
        detector=config.name,
        labels=panel.labels,
        entities=[job.output_labels(labels)["entity"] for labels in panel.labels],
        timestamps=times[replayed],
        values=panel.values[:, replayed],
        score=np.full(shape, np.nan),
        expected=np.full(shape, np.nan),
        lower=np.full(shape, np.nan),
        upper=np.full(shape, np.nan),
    )
    if not panel.labels:
        raise ValueError(f"the query {config.query!r} selected no series between {_iso(start)} and {_iso(end)}")
    offset = int(np.argmax(replayed))

    schedule = fit_times(start, end, config.fit_every)
    for number, fitted_at in enumerate(schedule):
        window = (times > fitted_at - config.fit_window - step / 2) & (times <= fitted_at + step / 2)
        began = time.perf_counter()
        model = job.new_detector().fit(panel.values[:, window], times[window])
        result.fit_seconds.append(time.perf_counter() - began)

        until = min(fitted_at + config.fit_every, end)
        scored = (times > fitted_at + step / 2) & (times <= until + step / 2)
        if scored.any():
            began = time.perf_counter()
            scores = model.score(panel.values[:, scored], times[scored])
            result.score_seconds += time.perf_counter() - began
            columns = np.flatnonzero(scored) - offset
            result.score[:, columns] = scores.score
            result.expected[:, columns] = scores.expected
            result.lower[:, columns] = scores.lower
            result.upper[:, columns] = scores.upper
        if progress is not None:
            progress((number + 1) / len(schedule))
    return result


def parse_time(text: str, now: float | None = None) -> float:
    """Parse ``now``, ``now-7d``, unix seconds or an RFC 3339 time into unix seconds."""
    from exporter.durations import parse_duration

    now = time.time() if now is None else now
    text = text.strip()
    if text == "now":
        return now
    if text.startswith("now-"):
        return now - parse_duration(text[4:])
    try:
        return float(text)
    except ValueError:
        pass
    import pandas as pd

    try:
        stamp = pd.Timestamp(text)
    except ValueError:
        raise ValueError(f"invalid time {text!r}: expected now, now-7d, unix seconds or RFC 3339 such as 2026-11-01T00:00:00Z") from None
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return stamp.timestamp()


def run_command(args) -> int:
    """Run ``anomaly-exporter backtest`` with parsed arguments; returns the exit status."""
    import sys
    from pathlib import Path

    from tqdm import tqdm

    from exporter import report
    from exporter.config import ConfigError, load_config
    from exporter.csvsource import CsvSource
    from exporter.source import PrometheusSource, QueryError, SourceUnavailable

    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    detectors = [d for d in config.detectors if not args.detector or d.name in args.detector]
    unknown = set(args.detector or []) - {d.name for d in config.detectors}
    if unknown:
        print(f"--detector: no detector named {', '.join(sorted(unknown))} in {args.config}", file=sys.stderr)
        return 2

    multi = [d.name for d in detectors if d.queries]
    if multi:
        # NOTE: replay works on one panel per detector; the tenant and equipment types read
        # several queries and are evaluated by bench/ instead.
        print(f"backtest replays single-query detectors only; {', '.join(multi)} read several queries: "
              "select other detectors with --detector", file=sys.stderr)
        return 2

    csv = config.source.csv
    try:
        if csv is not None:
            source = CsvSource(csv.path, timestamp_column=csv.timestamp_column, separator=csv.separator,
                               exclude_columns=csv.exclude_columns)
        else:
            source = PrometheusSource(config.source)
    except (FileNotFoundError, QueryError) as error:
        print(f"cannot read the source: {error}", file=sys.stderr)
        return 2

    try:
        # Defaults: the CSV files' whole range, or the last day of the query API.
        now = time.time()
        default_start, default_end = now - 86400, now
        if csv is not None and not (args.start and args.end):
            default_start, default_end = source.time_range([d.query for d in detectors])
        start = parse_time(args.start, now) if args.start else default_start
        end = parse_time(args.end, now) if args.end else default_end
        windows = {}
        if args.labels:
            try:
                windows = report.load_windows(Path(args.labels))
            except (OSError, ValueError) as error:
                raise ValueError(f"--labels {args.labels}: {error}") from None
    except (ValueError, OSError, QueryError) as error:
        print(f"cannot start the backtest: {error}", file=sys.stderr)
        return 2
    if end - start < min(d.step for d in detectors):
        print(f"invalid range: the end ({_iso(end)}) is not at least one step after the start ({_iso(start)}); "
              "check --from and --to, and that the data covers them", file=sys.stderr)
        return 2

    if args.format == "parquet":
        try:
            import pyarrow  # noqa: F401 - checked before a long replay, used by pandas
        except ImportError:
            print("--format parquet needs pyarrow: pip install 'anomaly-exporter[report]', or use --format csv",
                  file=sys.stderr)
            return 2

    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    failed = []
    for detector in detectors:
        bar = tqdm(total=100, desc=detector.name, unit="%", disable=args.quiet or not sys.stderr.isatty())
        done = [0]

        def advance(share, bar=bar, done=done):
            step = int(share * 100) - done[0]
            if step > 0:
                bar.update(step)
                done[0] += step

        try:
            result = replay(detector, source, start, end, progress=advance)
        except (QueryError, SourceUnavailable, ValueError) as error:
            # One failing detector must not discard the others' results.
            bar.close()
            print(f"detector {detector.name} failed: {error}", file=sys.stderr)
            failed.append(detector.name)
            continue
        bar.close()
        results.append(result)
        scored = int(np.count_nonzero(~np.isnan(result.score)))
        print(f"{detector.name}: {len(result.labels)} series, {scored} points scored, "
              f"{result.fits} fits in {sum(result.fit_seconds):.2f}s, scoring {result.score_seconds:.2f}s")

    frame = report.scores_frame(results)
    scores_path = report.write_scores(frame, folder / f"scores.{args.format}")
    print(f"scores: {scores_path}")
    if args.openmetrics:
        jobs = {d.name: DetectorJob(d, source, StateStore(None), SelfMetrics(CollectorRegistry())) for d in detectors}
        path = report.write_openmetrics(
            results, lambda result, row: jobs[result.detector].output_labels(result.labels[row]), folder / "scores.om")
        print(f"OpenMetrics for promtool tsdb create-blocks-from openmetrics: {path}")
    matched = {name for name in windows if any(
        report.windows_for(labels, result.entities[row], {name: windows[name]})
        for result in results for row, labels in enumerate(result.labels))}
    unmatched = sorted(set(windows) - matched)
    if unmatched:
        print(f"--labels: {len(unmatched)} of its names match no replayed series, such as {unmatched[0]!r}; "
              "use the entity (for example series=NAME), the series label or the file name", file=sys.stderr)
    if not args.no_report:
        path = report.write_html(results, windows, folder, args.max_plots, f"Backtest of {Path(args.config).name}")
        print(f"report: {path}")
    if failed:
        print(f"{len(failed)} detectors failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
