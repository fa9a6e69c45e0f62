"""The equipment detector type on SKAB's valve1 runs, end to end through a real Prometheus.

SKAB is a water-pump test bed with 8 sensors sampled once a second. Its 16 valve1 runs are
backfilled under gateway-style metric names, one metric per sensor in SKAB's own units. Where
examples/presets/equipment.yaml reads a sensor, the metric has the preset's name. Each run
is one machine, ``equipment="valve1-<run>"``, on a day of its own. For each run, a
MultiQueryJob of type equipment with step 1s and a fake clock fits on the run's first 400
rows, as SKAB's authors split the runs. It then scores the rest 15 s of data at a time, as
``score_every: 15s`` would.

The scores come back out of Prometheus. After every fit and score run, the samples that the
job's /metrics collector returns are recorded, each stamped with the time of the point it
scores. The recorded samples are written as OpenMetrics, backfilled into a second Prometheus
and read back with query_range at step 1s. A test row therefore gets the newest score at or
before it, as a rule evaluated at that time would. Pooled F1 over the runs is computed from
those values.

The preset's tests check it with the CLI, parse its queries, run its sensor queries on the
SKAB series and run its whole detector, speed and spectrum included, on synthetic gateway
series with an imbalance.

The module takes about 25 s on 2 cores, most of it in the 8 range queries of each of the
about 800 score runs.
"""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import promql_parser
import pytest
import yaml
from prometheus_client import CollectorRegistry

from detectors.equipment import EquipmentDetector, EquipmentParams
from exporter.config import DetectorConfig, SourceConfig
from exporter.datasets import list_skab_runs, read_skab_run
from exporter.demo.stack import PrometheusProcess, Series
from exporter.evaluation import point_metrics
from exporter.job import make_job
from exporter.metrics import AnomalyCollector, SelfMetrics
from exporter.source import PrometheusSource
from exporter.store import StateStore

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "examples" / "presets" / "equipment.yaml"

# 2023-11-15 00:00 UTC. Run k starts k days later.
FIRST_RUN_START = 1_700_006_400
RUN_SPACING = 86400
# Samples sit half a second before their grid time, so a 1 s lookup never falls on a sample's edge.
SAMPLE_OFFSET = 0.5
TRAIN_ROWS = 400
SCORE_EVERY = 15
QUERY_DELAY = 30.0
F1_FLOOR = 0.70
DETECTOR = "valves"

# SKAB column -> (query key, metric name, extra labels). Units are SKAB's: g, A, bar, °C, V, l/min.
SENSORS = {
    "Accelerometer1RMS": ("vibration_1", "pump_vibration_acceleration_rms_g", {"accelerometer": "1"}),
    "Accelerometer2RMS": ("vibration_2", "pump_vibration_acceleration_rms_g", {"accelerometer": "2"}),
    "Current": ("current", "pump_motor_current_amperes", {}),
    "Pressure": ("pressure", "pump_outlet_pressure_bar", {}),
    "Temperature": ("temperature", "pump_motor_temperature_celsius", {}),
    "Thermocouple": ("fluid_temperature", "pump_fluid_temperature_celsius", {}),
    "Voltage": ("voltage", "pump_motor_voltage_volts", {}),
    "Volume Flow RateRMS": ("flow", "pump_flow_rate_liters_per_minute", {}),
}
GATEWAY_LABELS = {"job": "pump-gateway", "instance": "gateway-1:9100"}


def sensor_query(metric: str, extra: dict[str, str]) -> str:
    selector = ",".join(f'{name}="{value}"' for name, value in extra.items())
    return f"max by (equipment) ({metric}{{{selector}}})" if selector else f"max by (equipment) ({metric})"


QUERIES = {key: sensor_query(metric, extra) for key, metric, extra in SENSORS.values()}
PARAMS = {"method": "limits", "window": "30s", "min_history": "5m"}


@dataclass(frozen=True)
class Run:
    name: str
    start: float
    values: np.ndarray
    """(sensors, rows) in the column order of SENSORS."""
    anomaly: np.ndarray

    @property
    def rows(self) -> int:
        return self.values.shape[1]

    def time(self, row) -> float:
        return self.start + row


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def after(self, grid_time: float) -> None:
        """Set the time so that the job's newest grid time, now minus the query delay, is ``grid_time``."""
        self.now = grid_time + QUERY_DELAY + 0.25


@pytest.fixture(scope="module")
def runs() -> list[Run]:
    keys = [key for key in list_skab_runs() if key.startswith("valve1/")]
    assert len(keys) == 16, f"expected SKAB's 16 valve1 runs, found {keys}"
    loaded = []
    for index, key in enumerate(keys):
        frame = read_skab_run(key)
        loaded.append(Run(
            name="valve1-" + Path(key).stem,
            start=float(FIRST_RUN_START + index * RUN_SPACING),
            values=frame[list(SENSORS)].to_numpy(dtype=np.float64).T,
            anomaly=frame["anomaly"].to_numpy(dtype=np.int64),
        ))
    return loaded


def input_series(runs: list[Run]) -> list[Series]:
    # SKAB's clock skips a second now and then, but its rows are consecutive samples, so they go
    # on a regular grid, as bench/skab.py does.
    series = []
    for run in runs:
        times = run.time(np.arange(run.rows)) - SAMPLE_OFFSET
        for row, (_, metric, extra) in enumerate(SENSORS.values()):
            labels = {"equipment": run.name, **GATEWAY_LABELS, **extra}
            series.append(Series(metric, labels, times, run.values[row]))
    return series


@pytest.fixture(scope="module")
def inputs(start_prometheus, runs) -> PrometheusProcess:
    return start_prometheus(input_series(runs))


def score_run(run: Run, source: PrometheusSource, exposed: dict) -> None:
    """Fit a new job on the run's training rows, score the rest and record what /metrics shows."""
    # A range query includes both ends, so a fit window of 399 s reads the 400 training rows.
    config = DetectorConfig.model_validate({
        "name": DETECTOR, "type": "equipment", "queries": QUERIES, "entity_labels": ["equipment"],
        "step": "1s", "fit_window": f"{TRAIN_ROWS - 1}s", "params": PARAMS,
    })
    clock, registry = FakeClock(), CollectorRegistry()
    job = make_job(config, source, StateStore(None), SelfMetrics(registry), clock=clock)
    collector = AnomalyCollector(lambda: [job], clock=clock)
    last_row = run.rows - 1
    clock.after(run.time(TRAIN_ROWS - 1))
    job.fit()
    record(job, collector, exposed)
    for row in [*range(TRAIN_ROWS - 1 + SCORE_EVERY, last_row, SCORE_EVERY), last_row]:
        clock.after(run.time(row))
        job.score()
        record(job, collector, exposed)

    # A failed run only logs and counts, so the failure counters show whether every run succeeded.
    for phase in ("fit", "score"):
        labels = {"detector": DETECTOR, "phase": phase, "result": "failure"}
        assert registry.get_sample_value("anomaly_exporter_runs_total", labels) == 0, f"{run.name}: a {phase} run failed"


def record(job, collector: AnomalyCollector, exposed: dict) -> None:
    """Add every sample on /metrics to ``exposed``, stamped with the time of the point it scores."""
    sample_times = {labels["entity"]: when for labels, when in zip(job.snapshot.labels, job.snapshot.sample_time)}
    for family in collector.collect():
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            exposed.setdefault(key, {})[float(sample_times[sample.labels["entity"]])] = sample.value


@pytest.fixture(scope="module")
def exposed(inputs, runs) -> dict:
    """Map (family, labels) to {sample time: value} over every fit and score run of every run."""
    exposed = {}
    source = PrometheusSource(SourceConfig(url=inputs.url, max_retries=0, query_delay=f"{QUERY_DELAY:g}s"))
    try:
        for run in runs:
            score_run(run, source, exposed)
    finally:
        source.close()
    return exposed


@pytest.fixture(scope="module")
def scores(start_prometheus, exposed) -> PrometheusProcess:
    """Start a second Prometheus that contains every recorded sample at its sample time."""
    series = []
    for (name, labels), points in exposed.items():
        times = sorted(points)
        series.append(Series(name, dict(labels), np.array(times), np.array([points[t] for t in times])))
    return start_prometheus(series)


def read_back(prometheus: PrometheusProcess, query: str, run: Run) -> np.ndarray:
    """Return the query's value at every test row of ``run``, NaN where Prometheus has none."""
    first, last = run.time(TRAIN_ROWS), run.time(run.rows - 1)
    result = prometheus.query_range(query, first, last, 1)
    assert len(result) == 1, f"{query} returned {len(result)} series for {run.name}, expected 1"
    values = np.full(run.rows - TRAIN_ROWS, np.nan)
    for when, value in result[0]["values"]:
        values[int(round(when - first))] = float(value)
    return values


def score_query(run: Run) -> str:
    return f'anomaly_score{{detector="{DETECTOR}",equipment="{run.name}"}}'


# --- detection quality ---------------------------------------------------------------------------


def test_valve1_f1_through_prometheus(scores, runs):
    truth, flagged = [], []
    for run in runs:
        values = read_back(scores, score_query(run), run)
        assert not np.isnan(values).any(), f"{run.name}: Prometheus has no score for some test rows"
        truth.append(run.anomaly[TRAIN_ROWS:])
        flagged.append(values >= 1.0)
    metrics = point_metrics(np.concatenate(truth), np.concatenate(flagged))
    print(f"valve1 through Prometheus, {len(runs)} runs: F1 {metrics.f1:.3f}, "
          f"precision {metrics.precision:.3f}, recall {metrics.recall:.3f}")
    assert metrics.f1 >= F1_FLOOR


def test_prometheus_scores_equal_detector_scores(scores, exposed, runs):
    # The same model fitted and scored in memory in one call: what Prometheus returns at each
    # scored time must be that score, so nothing is lost on the way through the job,
    # /metrics and the TSDB. The tolerance covers rounding, because the job orders the sensors
    # by key and scores in steps of 15 rows.
    for run in runs:
        detector = EquipmentDetector(EquipmentParams(**PARAMS), step=1.0)
        keys = [key for key, _, _ in SENSORS.values()]
        times = run.time(np.arange(run.rows, dtype=np.float64))
        detector.fit(run.values[:, :TRAIN_ROWS], times[:TRAIN_ROWS], entities=[run.name] * len(keys), sensors=keys)
        expected = detector.score(run.values[:, TRAIN_ROWS:], times[TRAIN_ROWS:]).entity_score[0]

        labels = (("detector", DETECTOR), ("entity", f"equipment={run.name}"), ("equipment", run.name))
        scored_rows = np.array([int(t - run.start) for t in exposed[("anomaly_score", labels)] if t >= run.time(TRAIN_ROWS)])
        values = read_back(scores, score_query(run), run)
        assert scored_rows.size >= (run.rows - TRAIN_ROWS) // SCORE_EVERY
        np.testing.assert_allclose(values[scored_rows - TRAIN_ROWS], expected[scored_rows - TRAIN_ROWS],
                                   rtol=1e-6, atol=1e-9,
                                   err_msg=f"{run.name}: scores read from Prometheus differ from the detector's")


# --- families of every run -----------------------------------------------------------------------


def test_every_run_has_score_and_contributions(scores, runs):
    sensors = {key for key, _, _ in SENSORS.values()}
    for run in runs:
        at = run.time(run.rows - 1)
        score = scores.query(score_query(run), at=at)
        assert len(score) == 1, f"{run.name}: no anomaly_score"
        assert set(score[0]["metric"]) == {"__name__", "equipment", "entity", "detector"}

        selector = f'{{detector="{DETECTOR}",equipment="{run.name}"}}'
        contributions = {s["metric"]["feature"]: float(s["value"][1])
                         for s in scores.query(f"anomaly_contribution_ratio{selector}", at=at)}
        assert set(contributions) == sensors, f"{run.name}: contributions of {sorted(contributions)}"
        assert all(0.0 <= share <= 1.0 for share in contributions.values())
        assert sum(contributions.values()) == pytest.approx(1.0, abs=1e-6)

        bands = {}
        for family in ("anomaly_lower", "anomaly_expected", "anomaly_upper"):
            for sample in scores.query(f"{family}{selector}", at=at):
                bands.setdefault(sample["metric"]["feature"], []).append(float(sample["value"][1]))
        assert set(bands) == sensors, f"{run.name}: bands of {sorted(bands)}"
        assert all(lower < expected < upper for lower, expected, upper in bands.values())

        ready = scores.query(f"anomaly_model_ready{selector}", at=at)
        assert [float(sample["value"][1]) for sample in ready] == [1.0]


# --- the preset ----------------------------------------------------------------------------------


def preset_detector() -> dict:
    config = yaml.safe_load(PRESET.read_text(encoding="utf-8"))
    detectors = [d for d in config["detectors"] if d["type"] == "equipment"]
    assert len(detectors) == 1, "the preset should have one equipment detector"
    return detectors[0]


def test_preset_passes_check_config():
    script = Path(sys.executable).parent / "anomaly-exporter"

    result = subprocess.run([str(script), "check-config", str(PRESET)], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_preset_queries_keep_entity_labels():
    detector = preset_detector()
    frequency_label = detector["params"].get("frequency_label", "frequency_hz")
    assert {"temperature", "pressure", "current", "flow", "vibration", "speed", "spectrum"} <= set(detector["queries"])
    for key, query in detector["queries"].items():
        expression = promql_parser.parse(query)
        # An aggregation must keep the labels the job reads, because without them the series of
        # different machines (or bands) merge into one.
        if isinstance(expression, promql_parser.AggregateExpr):
            needed = set(detector["entity_labels"]) | ({frequency_label} if key == "spectrum" else set())
            assert expression.modifier.type == promql_parser.AggModifierType.By, key
            assert needed <= set(expression.modifier.labels), f"{key}: {query} drops one of {sorted(needed)}"


def test_preset_sensor_queries_find_each_run(inputs, runs):
    # The SKAB series use the preset's metric names, so each of its sensor queries returns one
    # series per machine, with only the equipment label left.
    detector = preset_detector()
    sensor_queries = {key: query for key, query in detector["queries"].items() if key not in ("speed", "spectrum")}
    for run in runs:
        for key, query in sensor_queries.items():
            result = inputs.query(query, at=run.time(TRAIN_ROWS))
            assert [sample["metric"] for sample in result] == [{"equipment": run.name}], f"{key} at {run.name}"


# Synthetic gateway series for every query of the preset, speed and spectrum included: two
# pumps near 1480 rpm, 7 hours at 15 s, and pump p2's 1x vibration band triples in the last hour.
GATEWAY_END = 1_701_993_600  # 2023-12-08 00:00 UTC
GATEWAY_FAULT = GATEWAY_END - 3600
BANDS_HZ = np.arange(2.5, 150.1, 2.5)


def gateway_series() -> list[Series]:
    rng = np.random.default_rng(8)
    times = np.arange(GATEWAY_END - 7 * 3600, GATEWAY_END + 1, 15.0) - 5
    size = times.size
    series = []
    for pump in ("p1", "p2"):
        labels = {"equipment": pump, **GATEWAY_LABELS}
        for metric, level, noise in (("pump_motor_temperature_celsius", 60, 0.3), ("pump_outlet_pressure_bar", 5, 0.05),
                                     ("pump_motor_current_amperes", 12, 0.2), ("pump_flow_rate_liters_per_minute", 120, 1.5),
                                     ("pump_motor_speed_rpm", 1480, 3)):
            series.append(Series(metric, labels, times, level + rng.normal(0, noise, size)))
        for accelerometer in ("1", "2"):
            series.append(Series("pump_vibration_acceleration_rms_g", {**labels, "accelerometer": accelerometer},
                                 times, 0.03 + rng.normal(0, 0.002, size)))
        # The 25 Hz band contains 1x of 1480 rpm (24.7 Hz), and the 50 Hz band contains 2x.
        for frequency in BANDS_HZ:
            amplitude = {25.0: 0.05, 50.0: 0.02}.get(frequency, 0.005) * (1 + 0.05 * rng.standard_normal(size))
            if pump == "p2" and frequency == 25.0:
                amplitude = amplitude * np.where(times >= GATEWAY_FAULT, 3.0, 1.0)
            series.append(Series("pump_vibration_band_acceleration_g", {**labels, "frequency_hz": f"{frequency:g}"},
                                 times, amplitude))
    return series


def test_preset_detector_scores_gateway_faults(start_prometheus):
    prometheus = start_prometheus(gateway_series())
    options = dict(preset_detector(), fit_window="6h")
    source = PrometheusSource(SourceConfig(url=prometheus.url, max_retries=0, query_delay=f"{QUERY_DELAY:g}s"))
    clock = FakeClock()
    job = make_job(DetectorConfig.model_validate(options), source, StateStore(None), SelfMetrics(CollectorRegistry()),
                   clock=clock)
    try:
        clock.after(GATEWAY_FAULT - 60)
        job.fit()
        clock.after(GATEWAY_FAULT + 30 * 60)
        job.score()
        samples = [(family.name, sample.labels, sample.value)
                   for family in AnomalyCollector(lambda: [job], clock=clock).collect() for sample in family.samples]
    finally:
        source.close()

    scores = {labels["equipment"]: value for name, labels, value in samples if name == "anomaly_score"}
    assert set(scores) == {"p1", "p2"}
    assert max(scores.values()) < 1
    assert all(labels["site"] == "plant-1" for _, labels, _ in samples)
    features = {labels["feature"] for name, labels, _ in samples if name == "anomaly_contribution_ratio"}
    assert features == {"temperature", "pressure", "current", "flow", "vibration"}
    faults = {(labels["equipment"], labels["fault"], labels.get("bearing", "")): value
              for name, labels, value in samples if name == "anomaly_equipment_fault"}
    expected_faults = {("imbalance", ""), ("misalignment", ""), ("bearing_outer", "drive_end"), ("bearing_inner", "drive_end")}
    for pump in ("p1", "p2"):
        assert {(fault, bearing) for equipment, fault, bearing in faults if equipment == pump} == expected_faults
    assert faults[("p2", "imbalance", "")] >= 2
    assert faults[("p1", "imbalance", "")] < 1
    assert faults[("p2", "misalignment", "")] < 1
