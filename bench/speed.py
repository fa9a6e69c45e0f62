"""Speed benchmark: seasonal fit and score time, peak memory, /metrics scrape time and the read path.

Run from the repository root: ``python -m bench.speed``. Writes the ``speed`` section of
docs/benchmarks.md. Needs the ``prometheus`` and ``promtool`` binaries for the read path.

Fit and score run in a fresh subprocess per size, pinned to one core with single-threaded BLAS
and OpenMP, so each size's peak RSS (``ru_maxrss``) is its own. The scrape benchmark exposes a
snapshot of N series through AnomalyCollector and prometheus_client's ``generate_latest``. The
read path backfills N series into a real Prometheus on 127.0.0.1 and times
``PrometheusSource.query_range``.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from bench.report import environment_line, write_section

STEP = 300.0
DAYS = 14
COLUMNS = int(DAYS * 86400 / STEP)
# Whole days so that the synthetic daily cycle starts at local midnight.
START = 1704067200.0

FIT_SIZES = (1_000, 10_000, 100_000)
FALLBACK_SIZE = 30_000
FIT_TIMEOUT_SECONDS = 1800.0
SCRAPE_SIZES = (10_000, 100_000)
SCRAPE_REPEATS = 5
READ_SIZES = (1_000, 10_000)
READ_STEP = 60.0
READ_REPEATS = 3

# Targets on one core: 10k series fitted in 10 s and one new column of 10k series scored in 0.5 s.
AIM_FIT_SECONDS = 10.0
AIM_SCORE_SECONDS = 0.5

SINGLE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                         "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}


def synthetic_panel(n_series: int, columns: int, seed: int = 0) -> np.ndarray:
    """Build float32 series with a daily cycle, a slow trend and normal noise, in row chunks."""
    rng = np.random.default_rng(seed)
    t = np.arange(columns, dtype=np.float32) * np.float32(STEP)
    day = np.float32(2 * np.pi / 86400)
    panel = np.empty((n_series, columns), dtype=np.float32)
    for first in range(0, n_series, 5_000):
        rows = slice(first, min(first + 5_000, n_series))
        count = rows.stop - rows.start
        level = rng.uniform(10, 1000, (count, 1)).astype(np.float32)
        amplitude = level * rng.uniform(0.0, 0.5, (count, 1)).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, (count, 1)).astype(np.float32)
        trend = level * rng.normal(0, 0.01, (count, 1)).astype(np.float32) * t / np.float32(86400)
        noise = level * np.float32(0.03) * rng.standard_normal((count, columns), dtype=np.float32)
        panel[rows] = level + amplitude * np.sin(day * t + phase) + trend + noise
    return panel


def max_rss_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fit_worker(n_series: int) -> dict:
    """Fit and score ``n_series`` synthetic series in this process (pinned to one core)."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from detectors.seasonal import SeasonalDetector, SeasonalParams

    panel = synthetic_panel(n_series, COLUMNS + 1)
    times = START + STEP * np.arange(COLUMNS + 1, dtype=np.float64)
    data_rss = max_rss_bytes()
    detector = SeasonalDetector(SeasonalParams(), step=STEP)
    # Wall time and CPU time of this process: on a shared machine the process may wait for its
    # core, and the CPU time leaves that wait out.
    began, began_cpu = time.perf_counter(), time.process_time()
    detector.fit(panel[:, :COLUMNS], times[:COLUMNS])
    fit_seconds, fit_cpu = time.perf_counter() - began, time.process_time() - began_cpu
    # One new column for every series, as a score run every step would see it.
    scores, scores_cpu = [], []
    for _ in range(3):
        began, began_cpu = time.perf_counter(), time.process_time()
        detector.score(panel[:, COLUMNS:], times[COLUMNS:])
        scores.append(time.perf_counter() - began)
        scores_cpu.append(time.process_time() - began_cpu)
    return {
        "series": n_series, "fit_seconds": fit_seconds, "score_seconds": statistics.median(scores),
        "fit_cpu_seconds": fit_cpu, "score_cpu_seconds": statistics.median(scores_cpu),
        "ready": int(np.count_nonzero(detector.ready_)), "data_rss": data_rss, "max_rss": max_rss_bytes(),
        "cpus": sorted(os.sched_getaffinity(0)),
    }


def run_fit(n_series: int) -> dict:
    """Run fit_worker in a fresh interpreter; returns its result or an ``error`` entry."""
    env = {**os.environ, **SINGLE_THREAD}
    command = [sys.executable, "-m", "bench.speed", "--worker-fit", str(n_series)]
    began = time.monotonic()
    try:
        process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=FIT_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        return {"series": n_series, "error": f"timed out after {FIT_TIMEOUT_SECONDS:g} s"}
    wall = time.monotonic() - began
    if process.returncode != 0:
        reason = "killed (out of memory?)" if process.returncode < 0 else f"exit code {process.returncode}"
        tail = process.stderr.strip().splitlines()[-1:] or [""]
        return {"series": n_series, "error": f"{reason}: {tail[0][:200]}"}
    result = json.loads(process.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = wall
    return result


class _FakeJob:
    """The part of DetectorJob that AnomalyCollector reads: ``snapshot`` and ``config.stale_seconds``."""

    def __init__(self, snapshot):
        self.snapshot = snapshot
        self.config = SimpleNamespace(stale_seconds=600.0)


def build_snapshot(n_series: int, now: float):
    from exporter.job import Snapshot

    rng = np.random.default_rng(1)
    labels = [
        {"namespace": f"tenant-{i // 100:04d}", "pod": f"api-{i:06d}", "job": "kubernetes-pods",
         "entity": f"namespace=tenant-{i // 100:04d},pod=api-{i:06d}", "detector": "bench_cpu"}
        for i in range(n_series)
    ]
    expected = rng.uniform(0, 100, n_series)
    return Snapshot(
        labels=labels, sample_time=np.full(n_series, now), score=rng.exponential(0.3, n_series),
        expected=expected, lower=expected - 5, upper=expected + 5, ready=np.ones(n_series, dtype=bool),
    )


def run_scrape(n_series: int) -> dict:
    """Time generate_latest over a registry holding AnomalyCollector with one job of ``n_series``."""
    from prometheus_client import CollectorRegistry, generate_latest

    from exporter.metrics import AnomalyCollector

    now = time.time()
    job = _FakeJob(build_snapshot(n_series, now))
    registry = CollectorRegistry()
    registry.register(AnomalyCollector(lambda: [job], clock=lambda: now))
    times, size = [], 0
    for _ in range(SCRAPE_REPEATS):
        began = time.perf_counter()
        body = generate_latest(registry)
        times.append(time.perf_counter() - began)
        size = len(body)
    # Each of the five anomaly families adds a HELP and a TYPE line to its samples.
    return {"series": n_series, "seconds": statistics.median(times), "bytes": size,
            "samples": body.count(b"\n") - 2 * 5}


def run_read(n_series: int) -> dict:
    """Backfill ``n_series`` of one day at READ_STEP into a fresh Prometheus and time query_range."""
    from exporter.config import SourceConfig
    from exporter.demo.stack import PrometheusProcess, Series, backfill_series
    from exporter.source import PrometheusSource

    end = np.floor(time.time() / 3600) * 3600 - 3600
    start = end - 86400
    times = start + READ_STEP * np.arange(int(86400 / READ_STEP) + 1)
    panel = synthetic_panel(n_series, times.size, seed=2).astype(np.float64)
    series = (Series("bench_series", {"series": f"s{i:06d}", "job": "bench"}, times, panel[i])
              for i in range(n_series))
    with tempfile.TemporaryDirectory(prefix="anomaly-exporter-bench-") as directory:
        data_dir = Path(directory) / "data"
        began = time.monotonic()
        samples = backfill_series(series, data_dir, max_block_duration="24h")
        backfill_seconds = time.monotonic() - began
        del panel
        with PrometheusProcess(data_dir, extra_args=["--query.max-samples=200000000"]) as prometheus:
            source = PrometheusSource(SourceConfig(url=prometheus.url, timeout="300s", max_retries=0))
            durations = []
            for _ in range(READ_REPEATS):
                began = time.perf_counter()
                result = source.query_range("bench_series", start, end, READ_STEP)
                durations.append(time.perf_counter() - began)
            source.close()
    got = int(np.count_nonzero(~np.isnan(result.values)))
    return {"series": n_series, "samples": samples, "backfill_seconds": backfill_seconds,
            "seconds": statistics.median(durations), "all_seconds": durations,
            "rows": len(result.labels), "points": got, "columns": int(result.timestamps.size)}


def gigabytes(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def fit_table(fits: list[dict]) -> str:
    table = ("| series | fit, wall (s) | fit, CPU (s) | score one new column, wall (s) | score, CPU (s) | peak RSS "
             "| RSS of the input alone |\n|---|---|---|---|---|---|---|\n")
    for fit in fits:
        if "error" in fit:
            table += f"| {fit['series']:,} | failed: {fit['error']} | | | | | |\n"
            continue
        table += (f"| {fit['series']:,} | {fit['fit_seconds']:.2f} | {fit['fit_cpu_seconds']:.2f} | "
                  f"{fit['score_seconds']:.4f} | {fit['score_cpu_seconds']:.4f} | {gigabytes(fit['max_rss'])} | "
                  f"{gigabytes(fit['data_rss'])} |\n")
    return table


def extrapolation_note(fits: list[dict]) -> str:
    """Say how 100k series would scale when that size failed and a smaller size was measured instead."""
    failed = [f for f in fits if "error" in f]
    measured = {f["series"]: f for f in fits if "error" not in f}
    if not failed or FALLBACK_SIZE not in measured or 10_000 not in measured:
        return ""
    base = measured[FALLBACK_SIZE]
    factor = max(f["series"] for f in failed) / FALLBACK_SIZE
    return (f"\n{max(f['series'] for f in failed):,} series failed, so {FALLBACK_SIZE:,} were measured. A linear "
            f"extrapolation (an estimate, not a measurement) from {FALLBACK_SIZE:,} gives a fit of about "
            f"{base['fit_cpu_seconds'] * factor:.0f} s of CPU time, a score of {base['score_seconds'] * factor:.2f} s and a peak RSS "
            f"of about {gigabytes(base['max_rss'] * factor)}.\n")


def render(outcome: dict, command: str) -> str:
    fits, scrapes, reads = outcome["fits"], outcome["scrapes"], outcome["reads"]
    by_size = {f["series"]: f for f in fits if "error" not in f}
    ten = by_size.get(10_000)
    if ten:
        verdict = (f"At 10,000 series the fit took {ten['fit_seconds']:.1f} s of wall time and "
                   f"{ten['fit_cpu_seconds']:.1f} s of CPU time (target {AIM_FIT_SECONDS:g} s: "
                   f"{'met' if ten['fit_seconds'] <= AIM_FIT_SECONDS else 'missed'} in wall time, "
                   f"{'met' if ten['fit_cpu_seconds'] <= AIM_FIT_SECONDS else 'missed'} in CPU time), and scoring one "
                   f"new column took {ten['score_seconds']:.4f} s (target {AIM_SCORE_SECONDS:g} s: "
                   f"{'met' if ten['score_seconds'] <= AIM_SCORE_SECONDS else 'missed'}).")
    else:
        verdict = "The 10,000-series run failed, so the aims could not be checked."

    scrape_table = "| series | anomaly samples | body size | generate_latest (s, median of 5) |\n|---|---|---|---|\n"
    for scrape in scrapes:
        scrape_table += (f"| {scrape['series']:,} | {scrape['samples']:,} | {scrape['bytes'] / 2**20:.1f} MiB | "
                         f"{scrape['seconds']:.2f} |\n")

    read_table = ("| series | samples backfilled | promtool backfill (s) | query_range (s, median of 3) | all runs (s) "
                  "| points returned |\n|---|---|---|---|---|---|\n")
    for read in reads:
        if "error" in read:
            read_table += f"| {read['series']:,} | failed: {read['error']} | | | | |\n"
            continue
        runs = ", ".join(f"{value:.2f}" for value in read["all_seconds"])
        read_table += (f"| {read['series']:,} | {read['samples']:,} | {read['backfill_seconds']:.0f} | "
                       f"{read['seconds']:.2f} | {runs} | {read['points']:,} |\n")

    load = ", ".join(f"{value:.2f}" for value in outcome["load"])
    load_start = ", ".join(f"{value:.2f}" for value in outcome["load_start"])
    return f"""
Command: `{command}`. {environment_line()}. The 2 cores were shared with other jobs: load
average (1, 5, 15 min) {load_start} when the run started and {load} when it ended. Wall times are
therefore upper bounds for an idle machine; the fit table also gives the process's CPU time,
which leaves out the time spent waiting for the core.

### Fit and score

Synthetic series: {DAYS} days at {STEP / 60:g} minutes ({COLUMNS:,} columns), float32, each a daily
sine of random amplitude and phase on a random level with a slow trend and 3 % normal noise.
`SeasonalDetector` with default parameters fits the whole panel, then scores one new column
(median of 3). Each size runs in a fresh subprocess pinned to one core with
`os.sched_setaffinity`, with OMP, OpenBLAS and MKL at one thread; peak RSS is that process's
`ru_maxrss` and includes the input panel.

{fit_table(fits)}{extrapolation_note(fits)}
{verdict}

### /metrics exposition

A snapshot of N ready series (five labels each, as `entity` and `detector` are added by the job)
served by `exporter.metrics.AnomalyCollector` in its own registry, rendered by
prometheus_client's `generate_latest` as a scrape does. Each series has five samples
(`anomaly_score`, `_expected`, `_lower`, `_upper`, `anomaly_model_ready`).

{scrape_table}
### Read path from a real Prometheus

N synthetic series of one day at 1 minute, backfilled with promtool through
`exporter.demo.stack.backfill_series` (24-hour blocks) into a fresh Prometheus on 127.0.0.1
(`--query.max-samples` raised to 200 million so that limit cannot fail the query), then read with
`PrometheusSource.query_range` over that day at a 1-minute step: one HTTP request below the
10,000-points limit, JSON parsing and the panel. Prometheus and the client share the 2 cores.

{read_table}"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.splitlines()[0])
    parser.add_argument("--worker-fit", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(FIT_SIZES),
                        help="series counts to fit (default: 1000 10000 100000)")
    parser.add_argument("--no-read", action="store_true", help="skip the Prometheus read path")
    parser.add_argument("--no-write", action="store_true", help="print the results without touching docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.worker_fit:
        print(json.dumps(fit_worker(args.worker_fit)))
        return 0

    load_start = os.getloadavg()
    fits = []
    for size in args.sizes:
        result = run_fit(size)
        print(json.dumps(result), flush=True)
        fits.append(result)
        if "error" in result and size > FALLBACK_SIZE:
            fallback = run_fit(FALLBACK_SIZE)
            print(json.dumps(fallback), flush=True)
            fits.append(fallback)
    scrapes = []
    for size in SCRAPE_SIZES:
        scrapes.append(run_scrape(size))
        print(json.dumps(scrapes[-1]), flush=True)
    reads = []
    if not args.no_read:
        for size in READ_SIZES:
            try:
                reads.append(run_read(size))
            except Exception as error:  # noqa: BLE001 - report the failure in the table instead of losing the run
                reads.append({"series": size, "error": f"{type(error).__name__}: {str(error)[:200]}"})
            print(json.dumps(reads[-1]), flush=True)
    outcome = {"fits": fits, "scrapes": scrapes, "reads": reads, "load": os.getloadavg(), "load_start": load_start}
    body = render(outcome, "python -m bench.speed" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)))
    if args.no_write:
        print(body)
    else:
        write_section("speed", "Speed and memory", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
