"""The kubernetes-tenants preset on the tenant simulator in a real Prometheus, scored by the exporter.

60 tenants on 3 nodes, 7 days at 5 minutes, written as cAdvisor and kube-state-metrics series.
The last day carries one anomaly of every type and a noisy neighbour with three affected
tenants. ``bench.tenants.evaluate`` fits the preset's detector (fit window shortened to the 6
days before the last) and scores the last day every 15 minutes with a fake clock; its
docstring states the scoring rules. The weekly cycle is off here: 6 days of history cannot
teach a weekly cycle, and ``python -m bench.tenants`` covers it with 14 days.
"""

import pytest

from bench.tenants import evaluate
from detectors._tenant_sim import STEP, simulate_tenants
from exporter.demo.tenants import tenant_series

pytestmark = pytest.mark.stack

SIMULATION = simulate_tenants(60, 7, n_nodes=3, seed=1).shifted(-STEP / 2)


@pytest.fixture(scope="module")
def evaluation(start_prometheus):
    prometheus = start_prometheus(tenant_series(SIMULATION))
    return evaluate(SIMULATION, prometheus.url, check_every=3)


def test_every_score_run_succeeds(evaluation):
    assert evaluation.checks == 95


def test_recall_at_least_point_nine(evaluation):
    assert evaluation.recall >= 0.9, evaluation.found


def test_precision_at_least_point_eight(evaluation):
    assert evaluation.precision >= 0.8, sorted(evaluation.false_alarm_tenants)


def test_every_kind_found(evaluation):
    missed = {kind: found for kind, found in evaluation.found.items() if kind != "multivariate" and not all(found)}
    assert not missed


def test_types_named_right(evaluation):
    named = [right for values in evaluation.typed_right.values() for right in values]
    assert sum(named) >= 0.8 * len(named), evaluation.typed_right


def test_noisy_neighbour_on_its_node(evaluation):
    noisy = next(a for a in SIMULATION.anomalies if a.role == "noisy")
    assert (noisy.tenant, SIMULATION.node[noisy.tenant], "noisy") in evaluation.noisy_found


def test_only_injected_tenant_noisy(evaluation):
    reported = {tenant for tenant, _, role in evaluation.noisy_found if role == "noisy"}
    assert reported == {a.tenant for a in SIMULATION.anomalies if a.role == "noisy"}


def test_affected_tenants_reported(evaluation):
    affected = {(tenant, node) for tenant, node, role in evaluation.noisy_found if role == "affected"}
    injected = {(a.tenant, SIMULATION.node[a.tenant]) for a in SIMULATION.anomalies if a.role == "affected"}
    assert affected >= injected


def test_peer_groups_match_families(evaluation):
    assert evaluation.groups == 3
    assert evaluation.adjusted_rand >= 0.9
