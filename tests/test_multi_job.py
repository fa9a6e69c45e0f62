"""Integration tests of the tenant and equipment types run by MultiQueryJob against a real Prometheus.

The tenant history is the simulator of detectors/_tenant_sim.py (60 tenants on 3 nodes, 4 days
at 5 minutes, anomalies of every type and a noisy neighbour on the last day), stored as one
gauge per metric. The equipment history is three pumps with two sensors and a band spectrum.
On the last day, pump p3's current jumps and its 1x band triples. A fake clock chooses what
each run queries.
"""

import subprocess
import sys

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from detectors._tenant_sim import METRICS, simulate_tenants
from exporter.config import ConfigError, DetectorConfig, SourceConfig, parse_config
from exporter.demo.stack import PrometheusProcess, Series
from exporter.job import MultiQueryJob, make_job
from exporter.metrics import AnomalyCollector, SelfMetrics
from exporter.source import PrometheusSource
from exporter.store import StateStore

pytestmark = pytest.mark.stack

STEP = 300
HOUR = 3600
# Samples sit 30 s before each grid time, so an instant lookup never falls on a sample's edge.
SAMPLE_OFFSET = 30

SIM = simulate_tenants(60, 4, seed=3)
DAY_START = SIM.timestamps[0] + 3 * 86400
# A tenant that only exists from the middle of the last day and one that stops after day 3.
LATE_TENANT, LATE_FROM = "t_late", DAY_START + 6 * HOUR
GONE_TENANT = "t59"

EQUIPMENT_T0 = 1_699_920_000
FREQUENCIES = (12.5, 25.0, 50.0, 75.0, 100.0)
PUMP_FAULT_START = EQUIPMENT_T0 + 3 * 86400 + 6 * HOUR


def tenant_series() -> list[Series]:
    series = []
    times = SIM.timestamps - SAMPLE_OFFSET
    for row, (tenant, metric) in enumerate(zip(SIM.row_tenants, SIM.row_metrics)):
        keep = times < DAY_START if tenant == GONE_TENANT else np.ones(times.size, dtype=bool)
        series.append(Series(f"sim_tenant_{metric}", {"namespace": tenant}, times[keep], SIM.values[row][keep]))
        if tenant == "t01":
            late = times >= LATE_FROM
            series.append(Series(f"sim_tenant_{metric}", {"namespace": LATE_TENANT}, times[late], SIM.values[row][late]))
    for node, utilisation in SIM.node_cpu.items():
        series.append(Series("sim_node_cpu", {"node": node}, times, utilisation))
    for tenant, node in SIM.node.items():
        series.append(Series("sim_placement", {"namespace": tenant, "node": node}, times, np.ones(times.size)))
    return series


def equipment_series() -> list[Series]:
    rng = np.random.default_rng(5)
    times = np.arange(EQUIPMENT_T0, EQUIPMENT_T0 + 4 * 86400, 60, dtype=np.float64) - SAMPLE_OFFSET
    fault = times >= PUMP_FAULT_START
    series = []
    for pump in ("p1", "p2", "p3"):
        temperature = 60 + 2 * np.sin(2 * np.pi * times / 86400) + rng.normal(0, 0.3, times.size)
        current = 12 + rng.normal(0, 0.2, times.size)
        if pump == "p3":
            current = current + np.where(fault, 2.0, 0.0)
        series.append(Series("sim_pump_temperature_celsius", {"equipment": pump}, times, temperature))
        series.append(Series("sim_pump_current_amperes", {"equipment": pump}, times, current))
        for frequency in FREQUENCIES:
            amplitude = 0.02 * (1 + 0.05 * rng.standard_normal(times.size))
            if frequency == 25.0:  # 1x of a 1500 rpm shaft
                amplitude = amplitude + 1.0 * (1 + 0.05 * rng.standard_normal(times.size))
                if pump == "p3":
                    amplitude = amplitude * np.where(fault, 3.0, 1.0)
            series.append(Series("sim_pump_band_amplitude", {"equipment": pump, "frequency_hz": f"{frequency:g}"},
                                 times, amplitude))
    return series


TENANT_QUERIES = {metric: f"sim_tenant_{metric}" for metric in METRICS}
TENANT_QUERIES.update(node_cpu="sim_node_cpu", placement="sim_placement")
EQUIPMENT_QUERIES = {
    "temperature": "sim_pump_temperature_celsius",
    "current": "sim_pump_current_amperes",
    "spectrum": "sim_pump_band_amplitude",
}


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def at(self, grid_time: float) -> None:
        self.now = grid_time + 45  # the query delay is 30 s


@pytest.fixture(scope="module")
def prometheus(start_prometheus) -> PrometheusProcess:
    return start_prometheus(tenant_series() + equipment_series())


@pytest.fixture
def build(prometheus, tmp_path):
    sources = []

    def build(state_dir=None, **keys):
        options = {"name": "tenants", "type": "tenant", "queries": TENANT_QUERIES, "entity_labels": ["namespace"],
                   "step": "5m", "fit_window": "3d", "stale_after": "15m", "params": {"smoothing_points": 3}}
        options.update(keys)
        source = PrometheusSource(SourceConfig(url=prometheus.url, max_retries=0))
        sources.append(source)
        registry, clock = CollectorRegistry(), FakeClock()
        job = make_job(DetectorConfig.model_validate(options), source, StateStore(state_dir or tmp_path / "state"),
                       SelfMetrics(registry), clock=clock)
        return job, registry, clock

    yield build
    for source in sources:
        source.close()


def scrape(job, clock) -> list[tuple[str, dict, float]]:
    return [(family.name, sample.labels, sample.value)
            for family in AnomalyCollector(lambda: [job], clock=clock).collect() for sample in family.samples]


def family(samples, name: str, label: str = "namespace") -> dict[str, float]:
    return {labels[label]: value for family_name, labels, value in samples if family_name == name}


def anomalies_at(moment: float) -> dict[str, str]:
    return {a.tenant: a.kind for a in SIM.anomalies if a.start + 2 * STEP <= moment < a.end}


# --- tenants -------------------------------------------------------------------------------------


def test_tenant_fit_publishes_every_family(build):
    job, registry, clock = build()
    assert isinstance(job, MultiQueryJob)
    clock.at(DAY_START)
    job.fit()
    assert registry.get_sample_value("anomaly_exporter_runs_total",
                                     {"detector": "tenants", "phase": "fit", "result": "success"}) == 1
    samples = scrape(job, clock)
    scores = family(samples, "anomaly_score")
    assert len(scores) == 60
    assert max(scores.values()) < 1.0
    groups = family(samples, "anomaly_peer_group")
    # Tenants of one behaviour family share a peer group, and families get different groups.
    by_family = {}
    for tenant, group in groups.items():
        by_family.setdefault(SIM.family[tenant], set()).add(group)
    assert all(len(ids) == 1 for ids in by_family.values()) and len(set.union(*by_family.values())) == 3
    features = {labels["feature"] for name, labels, _ in samples if name == "anomaly_expected"}
    assert features == set(METRICS)
    first = next(labels for name, labels, _ in samples if name == "anomaly_contribution_ratio")
    assert set(first) == {"namespace", "entity", "detector", "feature"}
    assert first["entity"].startswith("namespace=t")


def test_tenant_anomalies_typed_and_noisy_neighbour_found(build):
    job, _, clock = build()
    clock.at(DAY_START)
    job.fit()
    found, flagged_clean, typed = set(), 0, {}
    noisy = set()
    checks = 0
    for moment in np.arange(DAY_START + STEP, DAY_START + 20 * HOUR, 3 * STEP):
        clock.at(moment)
        job.score()
        samples = scrape(job, clock)
        truth = anomalies_at(moment)
        for tenant, score in family(samples, "anomaly_score").items():
            if tenant in truth:
                checks += 1
                found.add(tenant) if score >= 1 else None
            elif score >= 1 and not any(a.tenant == tenant and a.start <= moment < a.end + 2 * HOUR for a in SIM.anomalies):
                flagged_clean += 1
        for name, labels, _ in samples:
            if name == "anomaly_type" and labels["namespace"] in truth:
                typed.setdefault(labels["namespace"], set()).add(labels["type"])
            if name == "anomaly_noisy_neighbor":
                noisy.add((labels["tenant"], labels["node"], labels["role"]))
    injected = {a.tenant for a in SIM.anomalies if a.start < DAY_START + 20 * HOUR}
    assert found >= injected - {"t50"}, f"missed {sorted(injected - found)}"
    assert flagged_clean <= 2
    assert "resource_exhaustion" in typed["t03"]
    assert "cpu_spike" in typed["t04"]
    assert "network_spike" in typed["t25"]
    assert ("t05", SIM.node["t05"], "noisy") in noisy
    assert {tenant for tenant, _, role in noisy if role == "affected"} >= {"t08", "t11", "t14"}
    assert {tenant for tenant, _, role in noisy if role == "noisy"} == {"t05"}


def test_tenant_churn_without_restart(build):
    # A new tenant needs min_history before the calibration window, so both are short here.
    job, registry, clock = build(params={"smoothing_points": 3, "calibration": "6h",
                                         "seasonal": {"min_history": "6h"}})
    clock.at(DAY_START)
    job.fit()
    clock.at(LATE_FROM + HOUR)
    job.score()
    samples = scrape(job, clock)
    assert family(samples, "anomaly_model_ready")[LATE_TENANT] == 0
    assert LATE_TENANT not in family(samples, "anomaly_score")
    assert GONE_TENANT not in family(samples, "anomaly_score")
    # The next refit has one hour of the new tenant, less than its baselines need.
    job.fit()
    clock.at(LATE_FROM + 14 * HOUR)
    job.fit()
    job.score()
    samples = scrape(job, clock)
    assert family(samples, "anomaly_model_ready")[LATE_TENANT] == 1
    assert family(samples, "anomaly_score")[LATE_TENANT] < 1
    # The tenant that stopped is stale, and not scored, until it leaves the fit window.
    assert GONE_TENANT not in family(samples, "anomaly_model_ready")
    assert registry.get_sample_value("anomaly_exporter_series", {"detector": "tenants", "state": "stale"}) == 1


def test_tenant_state_reloads_and_scores_without_fit(build, tmp_path):
    job, _, clock = build(state_dir=tmp_path / "kept")
    clock.at(DAY_START)
    job.fit()
    restarted, registry, clock = build(state_dir=tmp_path / "kept")
    assert restarted.load_state()
    clock.at(DAY_START + 10 * HOUR + 30 * 60)
    restarted.score()
    assert family(scrape(restarted, clock), "anomaly_score")["t03"] >= 2
    assert registry.get_sample_value("anomaly_exporter_runs_total",
                                     {"detector": "tenants", "phase": "fit", "result": "success"}) == 0


def test_corrupt_tenant_state_is_refitted(build, tmp_path):
    job, _, clock = build(state_dir=tmp_path / "broken")
    clock.at(DAY_START)
    job.fit()
    path = tmp_path / "broken" / "tenants.npz"
    path.write_bytes(path.read_bytes()[:200])
    restarted, _, _ = build(state_dir=tmp_path / "broken")
    assert not restarted.load_state()


def test_query_without_entity_label_fails_only_that_key(build):
    queries = dict(TENANT_QUERIES, cpu="sum(sim_tenant_cpu)")
    job, registry, clock = build(queries=queries)
    clock.at(DAY_START)
    job.fit()
    assert registry.get_sample_value("anomaly_exporter_series_dropped_total",
                                     {"detector": "tenants", "reason": "missing_entity_label"}) >= 1
    features = {labels["feature"] for name, labels, _ in scrape(job, clock) if name == "anomaly_expected"}
    assert "cpu" not in features
    assert "memory" in features


# --- equipment -----------------------------------------------------------------------------------


def equipment_job(build, state_dir=None, **params):
    return build(state_dir=state_dir, name="pumps", type="equipment", queries=EQUIPMENT_QUERIES, entity_labels=["equipment"],
                 step="1m", fit_window="2d", params={"window": "15m", "faults": {"running_speed_rpm": 1500}, **params})


def test_equipment_scores_sensor_shift_and_fault(build):
    job, _, clock = equipment_job(build)
    clock.at(PUMP_FAULT_START - HOUR)
    job.fit()
    clock.at(PUMP_FAULT_START - 10 * 60)
    job.score()
    before = scrape(job, clock)
    assert max(family(before, "anomaly_score", "equipment").values()) < 1
    clock.at(PUMP_FAULT_START + 30 * 60)
    job.score()
    after = scrape(job, clock)
    scores = family(after, "anomaly_score", "equipment")
    assert scores["p3"] >= 2
    assert scores["p1"] < 1
    assert scores["p2"] < 1
    shares = {(labels["equipment"], labels["feature"]): value
              for name, labels, value in after if name == "anomaly_contribution_ratio"}
    assert shares[("p3", "current")] > 0.9
    faults = {(labels["equipment"], labels["fault"]): value
              for name, labels, value in after if name == "anomaly_equipment_fault"}
    assert faults[("p3", "imbalance")] >= 2
    assert faults[("p1", "imbalance")] < 1
    assert faults[("p3", "misalignment")] < 1


def test_equipment_state_reloads(build, tmp_path):
    job, _, clock = equipment_job(build, state_dir=tmp_path / "pumps")
    clock.at(PUMP_FAULT_START - HOUR)
    job.fit()
    restarted, _, clock = equipment_job(build, state_dir=tmp_path / "pumps")
    assert restarted.load_state()
    clock.at(PUMP_FAULT_START + 30 * 60)
    restarted.score()
    assert family(scrape(restarted, clock), "anomaly_score", "equipment")["p3"] >= 2


def test_equipment_type_does_not_import_tensorflow():
    code = (
        "import sys\n"
        "from exporter.config import parse_config\n"
        "from exporter.job import make_job\n"
        "import detectors.equipment_model\n"
        "parse_config({'source': {'url': 'http://127.0.0.1:1'}, 'detectors': [{'name': 'p', 'type': 'equipment',"
        " 'entity_labels': ['equipment'], 'queries': {'t': 'x'}}]})\n"
        "print('tensorflow' in sys.modules)\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "False"


# --- configuration -------------------------------------------------------------------------------


def _config(**detector):
    base = {"name": "tenants", "type": "tenant", "entity_labels": ["namespace"], "queries": {"cpu": "x"}}
    base.update(detector)
    return {"source": {"url": "http://127.0.0.1:9090"}, "detectors": [base]}


@pytest.mark.parametrize(
    ("detector", "expected"),
    [
        ({"queries": {}, "query": "x"}, "move the PromQL into queries (a mapping of names to PromQL)"),
        ({"queries": {"cpu": "x", "gpu": "y"}}, "unknown key 'gpu' for the tenant type"),
        ({"queries": {"cpu": "x", "node_cpu": "y"}}, "needs both placement and node_cpu or node_memory"),
        ({"entity_labels": []}, "needs entity_labels"),
        ({"entity_labels": ["node"]}, "label 'node' is set by type 'tenant'"),
        ({"direction": "up"}, "direction must be 'both' for the tenant type"),
        ({"type": "seasonal"}, "type 'seasonal' reads one query"),
        ({"type": "seasonal", "queries": {}}, "detectors[0].query (detector 'tenants'): required key is missing"),
        ({"type": "equipment", "queries": {"spectrum": "x"}}, "no sensor key"),
        ({"type": "equipment", "queries": {"t": "x"}, "params": {"faults": {}}}, "the spectrum query is missing"),
        ({"queries": {"cpu": " "}}, "query 'cpu' is empty"),
        ({"queries": {}, "query": {"cpu": "x"}}, "write them under queries instead"),
    ],
)
def test_multi_query_configuration_errors(detector, expected):
    with pytest.raises(ConfigError) as error:
        parse_config(_config(**detector))
    assert expected in str(error.value)
    assert "detectors[0]" in str(error.value)


def test_noisy_neighbour_survives_refit(build):
    # A refit in the middle of the incident must not empty the window the search looks at.
    job, _, clock = build()
    clock.at(DAY_START + 12 * HOUR)
    job.fit()
    clock.at(DAY_START + 12 * HOUR + STEP)
    job.score()
    noisy = {(labels["tenant"], labels["node"], labels["role"])
             for name, labels, _ in scrape(job, clock) if name == "anomaly_noisy_neighbor"}
    assert ("t05", SIM.node["t05"], "noisy") in noisy
