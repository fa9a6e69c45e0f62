"""Hard cases for the tenant and equipment types: bad configuration, bad data, life cycle, exposition.

The configuration cases go through ``parse_config`` and one ``check-config`` subprocess. The
others read one real Prometheus, backfilled with two days at 5 minutes that end at the
current time, so the exporter CLI can read it too. It contains six tenants with CPU and
memory, a tenant that only has three hours of CPU, and a namespace that only appears in
placement. Two nodes report utilisation as ratios and as percentages. Two pumps have a
temperature and a band spectrum whose frequency labels include two that are not numbers.
"""

import copy
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import ConfigError, DetectorConfig, SourceConfig, parse_config
from exporter.demo.stack import Series, find_binary
from exporter.job import make_job
from exporter.metrics import AnomalyCollector, SelfMetrics
from exporter.source import PrometheusSource
from exporter.store import StateStore

pytestmark = pytest.mark.stack

STEP = 300
HOUR = 3600
SAMPLE_OFFSET = 30
END = (int(time.time()) // STEP) * STEP
START = END - 2 * 86400
TENANTS = [f"a{i}" for i in range(6)]
FREQUENCIES = ("12.5", "25", "50", "75", "100", "abc", "25Hz")

TENANT_QUERIES = {
    "cpu": "att_cpu",
    "memory": "att_memory",
    "node_cpu": "att_node_cpu",
    "placement": "att_placement",
}
TENANT_PARAMS = {"calibration": "2h", "smoothing_points": 3, "seasonal": {"min_history": "6h"}}


def attack_series() -> list[Series]:
    rng = np.random.default_rng(11)
    times = np.arange(START, END + 1, STEP, dtype=np.float64) - SAMPLE_OFFSET
    day = np.sin(2 * np.pi * times / 86400)
    series = []
    for index, tenant in enumerate(TENANTS):
        level = 1.0 + 0.2 * index
        series.append(Series("att_cpu", {"namespace": tenant}, times, level * (1 + 0.3 * day + rng.normal(0, 0.03, times.size))))
        series.append(Series("att_memory", {"namespace": tenant}, times, 1e9 * level * (1 + rng.normal(0, 0.01, times.size))))
        series.append(Series("att_placement", {"namespace": tenant, "node": f"n{index % 2}"}, times, np.ones(times.size)))
    late = times >= END - 3 * HOUR
    series.append(Series("att_cpu", {"namespace": "late"}, times[late], 1 + rng.normal(0, 0.03, int(late.sum()))))
    series.append(Series("att_placement", {"namespace": "placement_only", "node": "n0"}, times, np.ones(times.size)))
    for node in ("n0", "n1"):
        utilisation = 0.4 + 0.1 * day
        series.append(Series("att_node_cpu", {"node": node}, times, utilisation))
        series.append(Series("att_node_cpu_percent", {"node": node}, times, 100 * utilisation))
    for pump in ("m1", "m2"):
        series.append(Series("att_temperature", {"equipment": pump}, times, 60 + rng.normal(0, 0.3, times.size)))
        for frequency in FREQUENCIES:
            amplitude = 0.02 + (1.0 if frequency == "25" else 0.0) + rng.normal(0, 0.001, times.size)
            series.append(Series("att_band", {"equipment": pump, "frequency_hz": frequency}, times, amplitude))
    return series


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def at(self, grid_time: float) -> None:
        self.now = grid_time + 45  # the query delay is 30 s


@pytest.fixture(scope="module")
def prometheus(start_prometheus):
    return start_prometheus(attack_series())


@pytest.fixture
def build(prometheus, tmp_path):
    sources = []

    def build(source_class=PrometheusSource, state_dir=None, **keys):
        options = {"name": "tenants", "type": "tenant", "queries": TENANT_QUERIES, "entity_labels": ["namespace"],
                   "step": "5m", "fit_window": "1d", "stale_after": "15m", "params": TENANT_PARAMS}
        options.update(keys)
        source = source_class(SourceConfig(url=prometheus.url, max_retries=0))
        sources.append(source)
        registry, clock = CollectorRegistry(), FakeClock()
        job = make_job(DetectorConfig.model_validate(options), source, StateStore(state_dir or tmp_path / "state"),
                       SelfMetrics(registry), clock=clock)
        clock.at(END)
        return job, registry, clock

    yield build
    for source in sources:
        source.close()


def scrape(job, clock) -> list[tuple[str, dict, float]]:
    return [(family.name, sample.labels, sample.value)
            for family in AnomalyCollector(lambda: [job], clock=clock).collect() for sample in family.samples]


def values(samples, name: str, label: str = "namespace") -> dict[str, float]:
    return {labels[label]: value for family_name, labels, value in samples if family_name == name}


def runs(registry, phase: str, result: str) -> float:
    labels = {"detector": "tenants", "phase": phase, "result": result}
    return registry.get_sample_value("anomaly_exporter_runs_total", labels)


# --- configuration -------------------------------------------------------------------------------


def _config(**detector):
    base = {"name": "tenants", "type": "tenant", "entity_labels": ["namespace"], "queries": {"cpu": "x"}}
    base.update(detector)
    return {"source": {"url": "http://127.0.0.1:9090"}, "detectors": [base]}


def _problems(**detector) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_config(_config(**detector))
    return error.value.problems


@pytest.mark.parametrize(
    ("detector", "path", "expected"),
    [
        ({"queries": {}}, "detectors[0].queries", "no metric key: set at least one of cpu"),
        ({"queries": None}, "detectors[0].queries", "no metric key"),
        ({"query": "x"}, "detectors[0].query", "move the PromQL into queries"),
        ({"queries": ["cpu"]}, "detectors[0].queries", "expected a mapping of query names to PromQL"),
        ({"queries": {"cpu": 5}}, "detectors[0].queries.cpu", "expected a PromQL expression"),
        ({"queries": {True: "x"}}, "detectors[0].queries.True", "quote the name"),
        ({"queries": {"cpu": "x", "1x": "y"}}, "detectors[0].queries.1x", "invalid query name '1x'"),
        ({"queries": {"cpu": "x", "gpu": "y"}}, "detectors[0].queries.gpu", "unknown key 'gpu' for the tenant type"),
        ({"entity_labels": ["namespace", "node"]}, "detectors[0].entity_labels", "label 'node' is set by type 'tenant'"),
        ({"labels": {"namespace": "x"}}, "detectors[0].labels.namespace", "would replace the entity label"),
        ({"labels": {"role": "db"}}, "detectors[0].labels.role", "label 'role' is set by type 'tenant'"),
        ({"queries": {"cpu": "x", "node_cpu": "y", "placement": "z"}, "params": {"node_label": "namespace"}},
         "detectors[0].params.node_label", "is also an entity label"),
        ({"direction": "up"}, "detectors[0].direction", "set a side per metric in params.directions"),
        ({"fit_window": "3h", "step": "5m"}, "detectors[0].fit_window", "at least 3h55m"),
        ({"fit_window": "1d"}, "detectors[0].fit_window", "set fit_window to at least 1d7h58m"),
        ({"params": {"calibration": "5m"}}, "detectors[0].params.calibration", "at least 12m"),
        ({"type": "equipment", "entity_labels": ["equipment"], "queries": {"t": "x", "speed": "y"}},
         "detectors[0].queries.speed", "only the fault signatures read the speed"),
        ({"type": "equipment", "entity_labels": ["equipment"], "queries": {"t": "x"}, "params": {"window": "2m"}},
         "detectors[0].params.window", "expected at least 5"),
        ({"type": "equipment", "entity_labels": ["equipment"], "queries": {"t": "x"}, "fit_window": "1h"},
         "detectors[0].fit_window", "less than params.min_history 2h"),
        ({"type": "equipment", "entity_labels": ["frequency_hz"], "queries": {"t": "x", "spectrum": "y"},
          "params": {"faults": {"running_speed_rpm": 1500}}}, "detectors[0].params.frequency_label", "is also an entity label"),
    ],
)
def test_multi_query_config_error(detector, path, expected):
    problems = _problems(**detector)
    matching = [problem for problem in problems if problem.startswith(f"{path} (detector 'tenants'): ")]
    assert matching, problems
    assert any(expected in problem for problem in matching), matching


def test_config_lists_every_bad_key():
    problems = _problems(queries={"cpu": "x", "gpu": "y", "disk": "z"}, labels={"feature": "a"})
    paths = {problem.split(" ")[0] for problem in problems}
    assert paths == {"detectors[0].queries.gpu", "detectors[0].queries.disk", "detectors[0].labels.feature"}


@pytest.mark.parametrize(
    "detector",
    [
        {"type": "equipment", "entity_labels": ["node"], "queries": {"temperature": "x"}},
        {"type": "equipment", "entity_labels": ["equipment"], "labels": {"role": "pump"}, "queries": {"t": "x"}},
        {"fit_window": "2d"},
    ],
)
def test_multi_query_config_accepted(detector):
    parse_config(_config(**detector))


def test_check_config_exits_two_without_traceback(tmp_path):
    path = tmp_path / "odd.yml"
    path.write_text(
        "source: {url: http://127.0.0.1:9090}\n"
        "detectors:\n"
        "  - name: tenants\n"
        "    type: tenant\n"
        "    entity_labels: [namespace, node]\n"
        "    query: x\n"
        "    queries: {on: x, cpu: [a, b], gpu: y}\n"
        "  - name: pumps\n"
        "    type: equipment\n"
        "    entity_labels: [equipment]\n"
        "    queries: {spectrum: x, speed: y}\n"
        "    params: {faults: {bearings: [{name: de, bpfo: -1, bpfi: 5}]}}\n"
    )
    result = subprocess.run([sys.executable, "-m", "exporter", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()[1:]
    assert lines
    assert all(line.strip().startswith("detectors[") for line in lines), result.stderr


# --- bad data ------------------------------------------------------------------------------------


def test_bad_promql_fails_run_naming_key(build, caplog):
    job, registry, _ = build(queries=dict(TENANT_QUERIES, memory="rate(att_memory)"))
    job.fit()
    assert runs(registry, "fit", "failure") == 1
    assert "query 'memory'" in caplog.text
    assert "range vector" in caplog.text


def test_short_history_fails_fit_clearly(build, caplog):
    job, registry, clock = build(queries={"cpu": 'att_cpu{namespace="late"}'})
    job.fit()
    job.score()
    assert runs(registry, "fit", "failure") == 1
    assert runs(registry, "score", "success") == 1
    assert "seasonal.min_history (6h)" in caplog.text
    assert values(scrape(job, clock), "anomaly_model_ready") == {"late": 0}


def test_bands_shown_after_data_stops(build):
    # The newest grid points have no samples, but the newest scored point still gets its band.
    job, _, clock = build(stale_after="40m")
    clock.at(END + 20 * 60)
    job.fit()
    features = {(labels["namespace"], labels["feature"]) for name, labels, _ in scrape(job, clock)
                if name == "anomaly_expected"}
    assert features == {(tenant, metric) for tenant in TENANTS for metric in ("cpu", "memory")}


def test_placement_only_namespace_not_reported(build):
    job, _, clock = build()
    job.score()
    assert set(values(scrape(job, clock), "anomaly_model_ready")) == set(TENANTS) | {"late"}
    job.fit()
    assert set(values(scrape(job, clock), "anomaly_model_ready")) == set(TENANTS) | {"late"}


def test_max_series_counts_entities_across_queries(build):
    queries = dict(TENANT_QUERIES, memory='att_memory{namespace=~"a[345]"}')
    job, registry, clock = build(queries=queries, max_series=3)
    job.fit()
    assert set(values(scrape(job, clock), "anomaly_model_ready")) == {"a0", "a1", "a2"}
    dropped = registry.get_sample_value("anomaly_exporter_series_dropped_total",
                                        {"detector": "tenants", "reason": "max_series"})
    assert dropped == 4


def test_node_utilisation_in_percent_warns(build, caplog):
    job, registry, _ = build(queries=dict(TENANT_QUERIES, node_cpu="att_node_cpu_percent"))
    job.fit()
    assert runs(registry, "fit", "success") == 1
    assert "expected utilisation from 0 to 1" in caplog.text


def pump_job(build, **params):
    return build(name="tenants", type="equipment", entity_labels=["equipment"], fit_window="1d",
                 queries={"temperature": "att_temperature", "spectrum": "att_band"},
                 params={"window": "30m", "faults": {"running_speed_rpm": 1500}, **params})


def test_non_numeric_frequencies_dropped(build, caplog):
    job, registry, clock = pump_job(build)
    job.fit()
    dropped = registry.get_sample_value("anomaly_exporter_series_dropped_total",
                                        {"detector": "tenants", "reason": "invalid_label"})
    assert dropped == 4
    assert "'25Hz'" in caplog.text
    faults = {(labels["equipment"], labels["fault"]) for name, labels, _ in scrape(job, clock)
              if name == "anomaly_equipment_fault"}
    assert faults == {(pump, fault) for pump in ("m1", "m2") for fault in ("imbalance", "misalignment")}


def test_fault_above_spectrum_warns(build, caplog):
    job, registry, _ = pump_job(build, faults={"running_speed_rpm": 1500, "bearings": [{"name": "de", "bpfo": 5, "bpfi": 7}]})
    job.fit()
    assert runs(registry, "fit", "success") == 1
    assert "bearing_outer of bearing 'de'" in caplog.text
    assert "not scored" in caplog.text


# --- life cycle ----------------------------------------------------------------------------------


class PausedScoreSource(PrometheusSource):
    """A source whose score queries wait until ``release`` is set, to hold a score run open."""

    def __init__(self, config):
        super().__init__(config)
        self.waiting = threading.Event()
        self.release = threading.Event()

    def query_range(self, query, start, end, step):
        if end - start < HOUR and not self.release.is_set():
            self.waiting.set()
            self.release.wait(timeout=30)
        return super().query_range(query, start, end, step)


def test_score_during_fit_keeps_fit_results(build, tmp_path):
    job, registry, clock = build(source_class=PausedScoreSource, state_dir=tmp_path / "paused")
    scoring = threading.Thread(target=job.score)
    scoring.start()
    assert job.source.waiting.wait(timeout=30)

    def release_once_saved():
        while not (tmp_path / "paused" / "tenants.npz").exists():
            time.sleep(0.01)
        job.source.release.set()

    releasing = threading.Thread(target=release_once_saved, daemon=True)
    releasing.start()
    # The score run started before the model existed and ends while the fit waits to install it.
    job.fit()
    scoring.join(timeout=30)
    assert not scoring.is_alive()
    ready = values(scrape(job, clock), "anomaly_model_ready")
    assert {tenant: ready.get(tenant) for tenant in TENANTS} == dict.fromkeys(TENANTS, 1.0)
    assert runs(registry, "score", "failure") == 0


def test_retired_job_neither_saves_nor_counts(build, tmp_path):
    job, registry, _ = build(state_dir=tmp_path / "retired")
    job.retire()
    job.fit()
    assert not (tmp_path / "retired" / "tenants.npz").exists()
    assert runs(registry, "fit", "success") == 0
    assert runs(registry, "fit", "failure") == 0


def test_changed_queries_refit(build, tmp_path):
    job, _, _ = build(state_dir=tmp_path / "kept")
    job.fit()
    same, _, _ = build(state_dir=tmp_path / "kept")
    assert same.load_state()
    changed, _, _ = build(state_dir=tmp_path / "kept", queries=dict(TENANT_QUERIES, memory="att_memory * 2"))
    assert not changed.load_state()


def test_keras_file_of_other_fit_refits(build, tmp_path):
    state = tmp_path / "pumps"
    params = {"method": "autoencoder", "autoencoder_epochs": 3, "window": "30m", "min_history": "2h"}
    options = {"name": "pumps", "type": "equipment", "entity_labels": ["equipment"], "fit_window": "1d",
               "queries": {"temperature": "att_temperature"}, "params": params}
    first, _, clock = build(state_dir=state, **options)
    clock.at(END - 6 * HOUR)
    first.fit()
    shutil.copy(state / "pumps.keras", tmp_path / "older.keras")
    clock.at(END)
    first.fit()
    restarted, _, _ = build(state_dir=state, **options)
    assert restarted.load_state()
    shutil.copy(tmp_path / "older.keras", state / "pumps.keras")
    restarted, _, _ = build(state_dir=state, **options)
    assert not restarted.load_state()


# --- the exporter process ------------------------------------------------------------------------


class Exporter:
    """``anomaly-exporter run`` on a configuration file, with its stderr in a file."""

    def __init__(self, config_path: Path, log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "exporter", "run", "--config", str(config_path)],
                                        stdout=subprocess.DEVNULL, stderr=self._log)
        self.url = f"http://{self.wait_for_log('listening on (127.0.0.1:[0-9]+)')}"

    def wait_for_log(self, pattern: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log_path.read_text())
            if match:
                return match.group(1) if match.groups() else match.group(0)
            assert self.process.poll() is None, self.log_path.read_text()
            time.sleep(0.1)
        raise AssertionError(f"no log line matched {pattern!r}:\n{self.log_path.read_text()}")

    def metrics(self) -> str:
        return requests.get(f"{self.url}/metrics", timeout=10).text

    def wait_for(self, condition, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.metrics()
            if condition(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"/metrics never matched:\n{text}\n{self.log_path.read_text()}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self._log.close()


def parsed(text: str) -> list[tuple[str, dict]]:
    return [(sample.name, sample.labels) for family in text_string_to_metric_families(text) for sample in family.samples]


def has_features(text: str) -> bool:
    return any(name == "anomaly_expected" and "feature" in labels for name, labels in parsed(text))


def has_seasonal_scores(text: str) -> bool:
    names = [(name, labels) for name, labels in parsed(text) if labels.get("detector") == "tenants"]
    return any(name == "anomaly_expected" for name, _ in names) and not has_features(text)


def test_exporter_switches_types_on_reload(prometheus, tmp_path):
    tenant = {"name": "tenants", "type": "tenant", "queries": TENANT_QUERIES, "entity_labels": ["namespace"],
              "step": "5m", "fit_window": "1d", "score_every": "1s", "stale_after": "20m", "params": TENANT_PARAMS}
    seasonal = {"name": "tenants", "type": "seasonal", "query": "att_cpu", "entity_labels": ["namespace"],
                "step": "5m", "fit_window": "1d", "score_every": "1s", "stale_after": "20m",
                "params": {"min_history": "6h"}}
    state = tmp_path / "state"
    state.mkdir()
    (state / "tenants.npz").write_bytes(b"PK\x03\x04 truncated")
    config = {"source": {"url": prometheus.url, "query_delay": "0s", "max_retries": 0},
              "listen_address": "127.0.0.1:0", "state_dir": str(state), "detectors": [tenant]}
    path = tmp_path / "exporter.yml"
    path.write_text(yaml.safe_dump(config))
    exporter = Exporter(path, tmp_path / "stderr.log")
    try:
        text = exporter.wait_for(has_features)
        samples = parsed(text)
        keys = [(name, tuple(sorted(labels.items()))) for name, labels in samples]
        assert len(keys) == len(set(keys))
        check = subprocess.run([find_binary("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
        complaints = [line for line in check.stdout.splitlines() + check.stderr.splitlines()
                      if line.startswith("anomaly_") and not line.startswith("anomaly_exporter_shard_count")]
        assert complaints == []

        path.write_text(yaml.safe_dump({**config, "detectors": [seasonal]}))
        assert requests.post(f"{exporter.url}/-/reload", timeout=30).status_code == 200
        exporter.wait_for(has_seasonal_scores)

        path.write_text(yaml.safe_dump({**config, "detectors": [copy.deepcopy(tenant)]}))
        exporter.process.send_signal(signal.SIGHUP)
        exporter.wait_for(has_features)
    finally:
        assert exporter.stop() == 0
    log = exporter.log_path.read_text()
    assert "unreadable, refitting" in log
    assert "Traceback" not in log
