"""Integration tests of DetectorJob against a real Prometheus 2.42 on 127.0.0.1.

Four days of history are backfilled once for the module. Each test builds its own job with
a state folder under tmp_path, metrics in a fresh CollectorRegistry and a fake clock, and
calls fit() and score() directly. The clock decides which part of the history a run queries,
so staleness and churn do not depend on the wall clock. The data always comes from Prometheus.
"""

import logging

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from exporter.config import DetectorConfig, SourceConfig
from exporter.demo.stack import PrometheusProcess, Series
from exporter.job import DetectorJob
from exporter.metrics import AnomalyCollector, SelfMetrics
from exporter.source import PrometheusSource
from exporter.store import StateStore

pytestmark = pytest.mark.stack

# 2023-11-14 00:00:00 UTC, a day boundary, so that offsets read as times of day.
T0 = 1_699_920_000
MINUTE = 60
HOUR = 3600
DAY = 86400
STEP = 300
STALE_SECONDS = 15 * MINUTE

# Gauge samples are 30 s before each grid time, so the 5 minute lookback of an instant
# selector never falls exactly on a sample.
SAMPLE_OFFSET = 30

# Base level and daily amplitude of each job_load series.
SHAPES = {"i1": (100.0, 30.0), "i2": (50.0, 10.0), "i3": (200.0, 60.0), "gone": (80.0, 20.0), "late": (120.0, 40.0)}
LIFETIMES = {"gone": (T0, T0 + 2 * DAY + 4 * HOUR), "late": (T0 + 2 * DAY + 5 * HOUR, T0 + 4 * DAY)}
SPIKE = ("i3", T0 + 2 * DAY + 3 * HOUR + 30 * MINUTE, T0 + 2 * DAY + 3 * HOUR + 50 * MINUTE, 80.0)

# Counter rates in increments per second, the sample indexes of their resets and the value
# each reset restarts from. A restart value above zero keeps Prometheus' rate() from
# shortening its extrapolation at the sample after the reset, so both rates are exact.
COUNTERS = {
    "c1": (10.0, ((DAY + 2 * HOUR) // STEP, (DAY + 20 * HOUR) // STEP), 1000.0),
    "c2": (4.0, ((DAY + 10 * HOUR) // STEP,), 200.0),
}

# The first fit of most tests: two days of history up to T0 + 2d 3h.
FIRST_FIT = T0 + 2 * DAY + 3 * HOUR


def truth(instance: str, times: np.ndarray) -> np.ndarray:
    """Noise-free value of a job_load series."""
    base, amplitude = SHAPES[instance]
    return base + amplitude * np.sin(2 * np.pi * (times - T0) / DAY)


def load_series(rng: np.random.Generator) -> list[Series]:
    series = []
    for instance in SHAPES:
        first, last = LIFETIMES.get(instance, (T0, T0 + 4 * DAY))
        times = np.arange(first + MINUTE - SAMPLE_OFFSET, last, MINUTE, dtype=np.float64)
        values = truth(instance, times) + rng.normal(0.0, 1.0, times.size)
        if instance == SPIKE[0]:
            values[(times >= SPIKE[1]) & (times < SPIKE[2])] += SPIKE[3]
        series.append(Series("job_load", {"instance": instance}, times, values))
    return series


def counter_series() -> list[Series]:
    times = np.arange(T0, T0 + 4 * DAY + 1, STEP, dtype=np.float64)
    series = []
    for instance, (rate, resets, restart) in COUNTERS.items():
        values = np.empty(times.size)
        value = 0.0
        for index in range(times.size):
            value = restart if index in resets else value + rate * STEP
            values[index] = value
        series.append(Series("job_requests_total", {"instance": instance}, times, values))
    return series


def history() -> list[Series]:
    rng = np.random.default_rng(7)
    orphan_times = np.arange(T0 + MINUTE - SAMPLE_OFFSET, T0 + 4 * DAY, MINUTE, dtype=np.float64)
    orphan = Series("job_orphan", {"pod": "p1"}, orphan_times, np.ones(orphan_times.size))
    return load_series(rng) + counter_series() + [orphan]


class FakeClock:
    """Clock that the test sets. ``at(t)`` puts it just after grid time ``t`` plus the query delay."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def at(self, grid_time: float) -> None:
        # query_delay is 30s, so 45 s after t the job's newest grid time is t.
        self.now = grid_time + 45


@pytest.fixture(scope="module")
def prometheus(start_prometheus) -> PrometheusProcess:
    return start_prometheus(history())


@pytest.fixture
def make_job(prometheus, tmp_path):
    """Return a function that builds (job, registry, clock) from DetectorConfig keys."""
    sources = []

    def make_job(state_dir=None, **keys) -> tuple[DetectorJob, CollectorRegistry, FakeClock]:
        options = {
            "name": "load",
            "query": "job_load",
            "entity_labels": ["instance"],
            "type": "seasonal",
            "step": "5m",
            "fit_window": "2d",
            "stale_after": "15m",
        }
        options.update(keys)
        source = PrometheusSource(SourceConfig(url=prometheus.url, max_retries=0))
        sources.append(source)
        registry = CollectorRegistry()
        clock = FakeClock()
        job = DetectorJob(
            DetectorConfig.model_validate(options),
            source,
            StateStore(state_dir or tmp_path / "state"),
            SelfMetrics(registry),
            clock=clock,
        )
        return job, registry, clock

    yield make_job
    for source in sources:
        source.close()


def exposed(job: DetectorJob, clock: FakeClock) -> dict[str, dict[str, float]]:
    """Scrape the anomaly families for ``job`` as {family: {instance: value}}."""
    result: dict[str, dict[str, float]] = {}
    for family in AnomalyCollector(lambda: [job], clock=clock).collect():
        result[family.name] = {sample.labels["instance"]: sample.value for sample in family.samples}
    return result


def runs(registry: CollectorRegistry, phase: str, result: str) -> float:
    return registry.get_sample_value(
        "anomaly_exporter_runs_total", {"detector": "load", "phase": phase, "result": result}
    )


def series_in_state(registry: CollectorRegistry, state: str) -> float:
    return registry.get_sample_value("anomaly_exporter_series", {"detector": "load", "state": state})


def dropped(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("anomaly_exporter_series_dropped_total", {"detector": "load", "reason": reason})


def snapshot_by_instance(job: DetectorJob) -> dict[str, int]:
    return {labels["instance"]: index for index, labels in enumerate(job.snapshot.labels)}


# ---------------------------------------------------------------------------
# Fit and score
# ---------------------------------------------------------------------------


def test_fit_makes_series_ready(make_job):
    job, registry, clock = make_job()
    clock.at(FIRST_FIT)

    job.fit()

    assert runs(registry, "fit", "success") == 1
    snapshot = job.snapshot
    rows = snapshot_by_instance(job)
    assert sorted(rows) == ["gone", "i1", "i2", "i3"]
    assert snapshot.ready.all()
    assert np.isfinite(snapshot.score).all()
    assert (snapshot.lower < snapshot.expected).all()
    assert (snapshot.expected < snapshot.upper).all()
    for instance, row in rows.items():
        actual = truth(instance, np.array([snapshot.sample_time[row] - SAMPLE_OFFSET]))[0]
        assert snapshot.lower[row] < actual < snapshot.upper[row], instance
    assert series_in_state(registry, "ready") == 4
    assert exposed(job, clock)["anomaly_model_ready"] == {"gone": 1.0, "i1": 1.0, "i2": 1.0, "i3": 1.0}


def test_score_flags_spike(make_job):
    job, registry, clock = make_job()
    clock.at(FIRST_FIT)
    job.fit()

    clock.at(SPIKE[1] + 10 * MINUTE)
    job.score()

    assert runs(registry, "score", "success") == 1
    scores = exposed(job, clock)["anomaly_score"]
    assert scores["i3"] > 2
    assert scores["i1"] < 1
    assert scores["i2"] < 1


# ---------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------


def test_counter_rate_matches_prometheus(make_job, prometheus):
    job, _, clock = make_job(query="job_requests_total", counter=True)
    clock.at(T0 + 2 * DAY)
    start, end = T0 + DAY, T0 + 2 * DAY

    panel = job.query(start, end, "fit")

    # With samples every step, a window of step + 1s contains the two samples the job
    # subtracts, and rate() extrapolates them over exactly one step.
    reference = prometheus.query_range(f"rate(job_requests_total[{STEP + 1}s])", start, end, STEP)
    rows = {labels["instance"]: row for labels, row in zip(panel.labels, panel.values)}
    assert sorted(rows) == sorted(COUNTERS)
    for series in reference:
        instance = series["metric"]["instance"]
        expected = np.array([float(value) for _, value in series["values"]])
        times = np.array([float(time) for time, _ in series["values"]])
        np.testing.assert_array_equal(times, panel.timestamps)
        np.testing.assert_allclose(rows[instance], expected, rtol=1e-9)
        rate = COUNTERS[instance][0]
        assert np.nanmax(rows[instance]) <= rate * (1 + 1e-9), instance
        # The window contains a reset, where the rate dips below the constant rate.
        assert np.nanmin(rows[instance]) < rate, instance


def test_counter_fit_expects_rate(make_job):
    job, _, clock = make_job(query="job_requests_total", counter=True)
    clock.at(T0 + 2 * DAY + HOUR)

    job.fit()

    rows = snapshot_by_instance(job)
    assert sorted(rows) == sorted(COUNTERS)
    for instance, row in rows.items():
        rate = COUNTERS[instance][0]
        assert job.snapshot.ready[row], instance
        assert abs(job.snapshot.expected[row] - rate) < 0.01 * rate, instance


# ---------------------------------------------------------------------------
# Label checks and limits
# ---------------------------------------------------------------------------


def test_detector_label_fails_run(make_job, caplog):
    job, registry, clock = make_job(query='label_replace(job_load, "detector", "$1", "instance", "(.*)")')
    clock.at(FIRST_FIT)

    with caplog.at_level(logging.ERROR, logger="exporter.job"):
        job.fit()

    assert runs(registry, "fit", "failure") == 1
    assert runs(registry, "fit", "success") == 0
    assert job.snapshot is None
    messages = [record.getMessage() for record in caplog.records]
    assert any("'detector'" in message and "label_replace" in message for message in messages), messages


def test_missing_entity_label_dropped(make_job):
    job, registry, clock = make_job(query='job_load{instance=~"i.*"} or job_orphan')
    clock.at(FIRST_FIT)

    job.fit()

    assert dropped(registry, "missing_entity_label") == 1
    assert sorted(snapshot_by_instance(job)) == ["i1", "i2", "i3"]
    assert runs(registry, "fit", "success") == 1


def test_max_series_caps(make_job):
    job, registry, clock = make_job(query='job_load{instance=~"i.*"}', max_series=2)
    clock.at(FIRST_FIT)

    job.fit()

    assert dropped(registry, "max_series") == 1
    assert sorted(snapshot_by_instance(job)) == ["i1", "i2"]


# ---------------------------------------------------------------------------
# Churn, staleness and saved state
# ---------------------------------------------------------------------------


def test_new_series_warms_then_ready(make_job):
    job, registry, clock = make_job()
    clock.at(FIRST_FIT)
    job.fit()

    clock.at(LIFETIMES["late"][0] + 30 * MINUTE)
    job.score()

    first = exposed(job, clock)
    assert first["anomaly_model_ready"].get("late") == 0.0
    assert "late" not in first["anomaly_score"]
    assert series_in_state(registry, "warming") == 1

    # One day and one hour after the series started, it has the default min_history of 1d.
    clock.at(LIFETIMES["late"][0] + DAY + HOUR)
    job.fit()

    second = exposed(job, clock)
    assert second["anomaly_model_ready"].get("late") == 1.0
    assert "late" in second["anomaly_score"]
    assert series_in_state(registry, "warming") == 0


def test_stopped_series_goes_stale(make_job):
    job, registry, clock = make_job()
    clock.at(FIRST_FIT)
    job.fit()
    clock.at(LIFETIMES["gone"][1] - 30 * MINUTE)
    job.score()
    assert "gone" in exposed(job, clock)["anomaly_score"]

    clock.at(LIFETIMES["gone"][1] + 30 * MINUTE)
    job.score()

    scrape = exposed(job, clock)
    assert "gone" not in scrape["anomaly_score"]
    assert "gone" not in scrape["anomaly_model_ready"]
    assert sorted(scrape["anomaly_score"]) == ["i1", "i2", "i3"]
    assert series_in_state(registry, "stale") == 1
    row = snapshot_by_instance(job)["gone"]
    assert job.snapshot.sample_time[row] < clock() - STALE_SECONDS


def test_saved_state_scores_without_fit(make_job, tmp_path):
    state_dir = tmp_path / "shared-state"
    fitted, _, clock = make_job(state_dir=state_dir)
    clock.at(FIRST_FIT)
    fitted.fit()

    loaded, registry, loaded_clock = make_job(state_dir=state_dir)
    assert loaded.load_state()
    loaded_clock.at(FIRST_FIT + 30 * MINUTE)
    loaded.score()

    assert runs(registry, "fit", "success") == 0
    assert runs(registry, "fit", "failure") == 0
    assert runs(registry, "score", "success") == 1
    rows = snapshot_by_instance(loaded)
    assert sorted(rows) == ["gone", "i1", "i2", "i3"]
    assert loaded.snapshot.ready.all()
    assert np.isfinite(loaded.snapshot.score).all()

    # The job that fitted scores the same points with its model in memory.
    clock.at(FIRST_FIT + 30 * MINUTE)
    fitted.score()
    fitted_rows = snapshot_by_instance(fitted)
    for instance, row in rows.items():
        assert loaded.snapshot.score[row] == pytest.approx(fitted.snapshot.score[fitted_rows[instance]], rel=1e-9)
