"""The tenant simulator in a real Prometheus, read back through the Kubernetes tenant preset.

A simulation of 60 tenants on 3 nodes over 3 days (anomalies on the last day) is turned into
cAdvisor, kube-state-metrics and HTTP histogram series and backfilled so that it ends now. Every
query of examples/presets/kubernetes-tenants.yaml must then return the simulated values. The
queries run at multiples of the step, as the exporter runs them. The last section checks the
simulator's node count, anomaly placement and weekly cycle without Prometheus.
"""

import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from detectors._tenant_sim import (
    DAY,
    MIN_TENANTS_PER_NODE,
    START,
    STEP,
    node_names,
    simulate_tenants,
)
from detectors.noisy_neighbor import NoisyNeighborParams
from detectors.tenant import METRICS
from exporter.config import load_config
from exporter.demo.tenants import end_between_steps, shift_to_end, tenant_series

PRESET = Path(__file__).resolve().parents[1] / "examples/presets/kubernetes-tenants.yaml"
NODE_KEYS = ("node_cpu", "node_memory")
STRESS = NoisyNeighborParams().stress_ratio
HOUR_COLUMNS = int(3600 / STEP)


def load_preset() -> dict:
    return yaml.safe_load(PRESET.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def simulation():
    simulated = simulate_tenants(60, 3, n_nodes=3, weekly=True, seed=1)
    return shift_to_end(simulated, end_between_steps(time.time()))


@pytest.fixture(scope="module")
def results(simulation, start_prometheus):
    """Run every preset query over the whole simulation and return {key: query_range result}."""
    prometheus = start_prometheus(list(tenant_series(simulation)))
    queries = load_preset()["detectors"][0]["queries"]
    first = simulation.timestamps[0] + STEP / 2
    last = simulation.timestamps[-1] + STEP / 2
    assert first % STEP == 0
    return {key: prometheus.query_range(query, first, last, STEP) for key, query in queries.items()}


def values_of(series: dict, expected_points: int) -> np.ndarray:
    """Return the values of one query_range series, checking that no point is missing."""
    values = np.array([float(value) for _, value in series["values"]])
    assert values.size == expected_points, series["metric"]
    return values


# --- preset --------------------------------------------------------------------------------------


def test_preset_is_one_tenant_detector():
    preset = load_preset()
    assert preset["source"]["url"] == "http://prometheus:9090"
    assert len(preset["detectors"]) == 1
    detector = preset["detectors"][0]
    assert detector["type"] == "tenant"
    assert detector["entity_labels"] == ["namespace"]
    assert detector["step"] == "5m"
    assert detector["fit_window"] == "14d"
    assert "query" not in detector


def test_preset_passes_config_validation():
    config = load_config(PRESET)
    assert [detector.name for detector in config.detectors] == ["kubernetes_tenants"]
    assert config.detectors[0].step == STEP


def test_preset_has_every_query_key():
    queries = load_preset()["detectors"][0]["queries"]
    assert set(queries) == set(METRICS) | set(NODE_KEYS) | {"placement"}
    assert all(isinstance(query, str) and query.strip() for query in queries.values())


# --- preset queries against the backfilled simulation ---------------------------------------------


@pytest.mark.stack
@pytest.mark.parametrize("metric", METRICS)
def test_tenant_query_matches_simulation(metric, simulation, results):
    series = results[metric]
    assert len(series) == len(simulation.tenants)
    assert all(set(item["metric"]) == {"namespace"} for item in series)
    assert {item["metric"]["namespace"] for item in series} == set(simulation.tenants)
    expected = simulation.metric_values(metric)
    for item in series:
        row = simulation.tenants.index(item["metric"]["namespace"])
        values = values_of(item, simulation.timestamps.size)
        np.testing.assert_allclose(values, expected[row], rtol=1e-9, err_msg=f"{metric} of {item['metric']}")


@pytest.mark.stack
def test_tenant_queries_match_during_anomalies(simulation, results):
    assert len(simulation.anomalies) == 10
    for anomaly in simulation.anomalies:
        inside = (simulation.timestamps >= anomaly.start) & (simulation.timestamps < anomaly.end)
        assert inside.any(), anomaly
        row = simulation.tenants.index(anomaly.tenant)
        for metric in METRICS:
            (item,) = [s for s in results[metric] if s["metric"]["namespace"] == anomaly.tenant]
            values = values_of(item, simulation.timestamps.size)[inside]
            expected = simulation.metric_values(metric)[row, inside]
            np.testing.assert_allclose(values, expected, rtol=1e-9, err_msg=f"{metric} during {anomaly}")


@pytest.mark.stack
@pytest.mark.parametrize("key", NODE_KEYS)
def test_node_query_matches_simulation(key, simulation, results):
    series = results[key]
    expected = simulation.node_cpu if key == "node_cpu" else simulation.node_memory
    assert len(series) == len(simulation.nodes)
    assert all(set(item["metric"]) == {"node"} for item in series)
    assert {item["metric"]["node"] for item in series} == set(simulation.nodes)
    for item in series:
        values = values_of(item, simulation.timestamps.size)
        np.testing.assert_allclose(values, expected[item["metric"]["node"]], atol=1e-9, err_msg=f"{key} of {item['metric']}")


@pytest.mark.stack
def test_node_cpu_shows_noisy_neighbor(simulation, results):
    (noisy,) = [anomaly for anomaly in simulation.anomalies if anomaly.role == "noisy"]
    inside = (simulation.timestamps >= noisy.start) & (simulation.timestamps < noisy.end)
    by_node = {item["metric"]["node"]: values_of(item, simulation.timestamps.size) for item in results["node_cpu"]}
    noisy_node = simulation.node[noisy.tenant]
    assert np.all(by_node[noisy_node][inside] >= STRESS)
    assert np.all(by_node[noisy_node][~inside] < STRESS)
    for node, values in by_node.items():
        if node != noisy_node:
            assert np.all(values < STRESS), node


@pytest.mark.stack
def test_placement_query_matches_simulation(simulation, results):
    series = results["placement"]
    assert len(series) == len(simulation.tenants)
    assert all(set(item["metric"]) == {"namespace", "node"} for item in series)
    placement = {item["metric"]["namespace"]: item["metric"]["node"] for item in series}
    assert placement == simulation.node
    for item in series:
        assert np.all(values_of(item, simulation.timestamps.size) == 1)


# --- simulator -------------------------------------------------------------------------------------


def test_benchmark_size_places_every_anomaly():
    simulation = simulate_tenants(200, 14, n_nodes=5, weekly=True)
    last_day = START + 13 * DAY
    assert simulation.nodes == list(node_names(5))
    assert len(simulation.tenants) == 200
    assert len(simulation.anomalies) == 10
    assert len({anomaly.tenant for anomaly in simulation.anomalies}) == 10
    assert all(last_day <= anomaly.start < anomaly.end <= last_day + DAY for anomaly in simulation.anomalies)

    kinds = sorted(anomaly.kind for anomaly in simulation.anomalies)
    assert kinds == sorted(
        ["resource_exhaustion", "network_spike", "cpu_spike", "cpu_spike", "multivariate"] + ["behavioural"] * 5
    )
    roles = [(simulation.node[anomaly.tenant], anomaly.role) for anomaly in simulation.anomalies if anomaly.role]
    assert sorted(roles) == [("n4", "affected")] * 3 + [("n4", "noisy")]


def test_benchmark_size_stresses_only_noisy_node():
    simulation = simulate_tenants(200, 14, n_nodes=5, weekly=True)
    (noisy,) = [anomaly for anomaly in simulation.anomalies if anomaly.role == "noisy"]
    inside = (simulation.timestamps >= noisy.start) & (simulation.timestamps < noisy.end)
    assert np.all(simulation.node_cpu["n4"][inside] >= STRESS)
    assert np.all(simulation.node_cpu["n4"][~inside] < STRESS)
    for node in ("n0", "n1", "n2", "n3"):
        assert np.all(simulation.node_cpu[node] < STRESS), node
        assert np.all(simulation.node_memory[node] <= 1.0), node

    # Affected tenants slow down from 10 minutes into the incident. Compare with the hour before it.
    first = int(np.flatnonzero(inside)[0])
    during = slice(first + 2, first + 2 * HOUR_COLUMNS)
    before = slice(first - HOUR_COLUMNS, first)
    for anomaly in simulation.anomalies:
        if anomaly.role == "affected":
            latency = simulation.metric_values("latency")[simulation.tenants.index(anomaly.tenant)]
            assert np.median(latency[during]) > 2 * np.median(latency[before]), anomaly.tenant


def test_minimum_tenants_for_injection():
    smallest = MIN_TENANTS_PER_NODE * 4
    assert len(simulate_tenants(smallest, 1, n_nodes=4).anomalies) == 10
    with pytest.raises(ValueError, match=r"n_tenants >= 15 \* n_nodes \(got n_tenants=40, n_nodes=4\)"):
        simulate_tenants(40, 1, n_nodes=4)
    with pytest.raises(ValueError, match="at least 3 nodes"):
        simulate_tenants(100, 1, n_nodes=2)
    assert simulate_tenants(10, 1, n_nodes=2, inject=False).anomalies == []


def test_weekly_cycle_per_family():
    weekly = simulate_tenants(60, 14, weekly=True, noise_ratio=0.0, inject=False)
    daily = simulate_tenants(60, 14, weekly=False, noise_ratio=0.0, inject=False)
    cpu = weekly.metric_values("cpu")
    web, batch, evening = (weekly.tenants.index(name) for name in ("t00", "t20", "t40"))
    assert (weekly.family["t00"], weekly.family["t20"], weekly.family["t40"]) == ("web", "batch", "evening")

    def at(day: int, hour: float) -> int:
        return day * int(DAY / STEP) + int(hour * HOUR_COLUMNS)

    # Day 0 is a Monday, so days 5 and 6 are Saturday and Sunday.
    assert cpu[web, at(5, 13)] < 0.6 * cpu[web, at(2, 13)]
    assert cpu[web, at(7, 13)] == pytest.approx(cpu[web, at(0, 13)])
    assert cpu[batch, at(6, 3)] > 1.5 * cpu[batch, at(3, 3)]
    assert cpu[evening, at(5, 20)] > 1.1 * cpu[evening, at(1, 20)]
    daily_cpu = daily.metric_values("cpu")
    assert daily_cpu[web, at(5, 13)] == pytest.approx(daily_cpu[web, at(2, 13)])


def test_shift_moves_samples_and_truth():
    simulation = simulate_tenants(60, 2)
    end = end_between_steps(2_000_000_000.0)
    shifted = shift_to_end(simulation, end)
    offset = end - simulation.timestamps[-1]
    assert shifted.timestamps[-1] == end
    assert end % STEP == STEP / 2
    assert np.array_equal(shifted.truth(shifted.tenants, shifted.timestamps), simulation.truth(simulation.tenants, simulation.timestamps))
    assert shifted.anomalies[0].start == simulation.anomalies[0].start + offset
    assert shifted.values is simulation.values
