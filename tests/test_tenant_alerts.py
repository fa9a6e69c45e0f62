"""Tenant alerts end to end: the preset in the exporter process, the shipped rules, Alertmanager.

The simulation (60 tenants on 3 nodes, 7 days) is cut at 11:45 of its last day and moved so
that the cut is now. At that moment tenant t03's resource exhaustion (10:00 to 12:00) and the
noisy-neighbour incident (t05 noisy, three tenants affected, from 11:00) are running; the
morning's CPU spike and behavioural change ended over an hour before. The exporter fits the
preset's detector at start and publishes the newest 20 minutes, Prometheus evaluates the
rules with short `for` durations, and the webhook receiver collects what Alertmanager sends.
"""

import dataclasses
import time

import numpy as np
import pytest

from detectors._tenant_sim import DAY, STEP, simulate_tenants
from exporter.demo.stack import AlertingStack, backfill_series, free_port
from exporter.demo.tenants import end_between_steps, shift_to_end, tenant_series
from rules.render import RuleParameters, render_rule_groups
from bench.tenants import preset_detector

pytestmark = pytest.mark.stack

CUT_HOUR = 11.75
FAST_RULES = RuleParameters(
    evaluation_interval="1s",
    warning_for="5s",
    critical_for="5s",
    noisy_neighbor_for="5s",
    noisy_neighbor_critical_for="10m",
    peer_warning_for="5s",
    peer_critical_for="5s",
)
# Time for the receiver to get every alert after the first one, before the silence check.
SETTLE_SECONDS = 20


def cut_simulation():
    simulation = simulate_tenants(60, 7, n_nodes=3, seed=1)
    keep = simulation.timestamps <= simulation.timestamps[0] + 6 * DAY + CUT_HOUR * 3600
    columns = int(np.count_nonzero(keep))
    rows = simulation.values[:, :columns]
    cut = dataclasses.replace(
        simulation,
        values=rows,
        timestamps=simulation.timestamps[:columns],
        node_cpu={node: values[:columns] for node, values in simulation.node_cpu.items()},
        node_memory={node: values[:columns] for node, values in simulation.node_memory.items()},
    )
    return shift_to_end(cut, end_between_steps(time.time()))


def active_at(simulation, moment: float) -> set[str]:
    return {a.tenant for a in simulation.anomalies if a.start <= moment < a.end and a.kind != "multivariate"}


@pytest.fixture(scope="module")
def alerts(tmp_path_factory):
    work = tmp_path_factory.mktemp("tenant-alerts")
    simulation = cut_simulation()
    backfill_series(tenant_series(simulation), work / "tsdb")
    detector = preset_detector("7d")
    detector.update(stale_after="20m", score_every="10s", fit_every="1h")
    config = {"source": {"query_delay": "0s", "timeout": "20s"}, "state_dir": str(work / "state"),
              "detectors": [detector]}
    stack = AlertingStack(
        work, tsdb=work / "tsdb", simulator_target=f"127.0.0.1:{free_port()}",
        rule_groups=render_rule_groups(FAST_RULES), exporter_config=config,
        inhibit_rules=[{"source_matchers": ['severity="critical"'], "target_matchers": ['severity="warning"'],
                        "equal": ["alertname", "detector", "entity", "fault", "bearing", "node"]}],
    )
    with stack:
        try:
            stack.receiver.wait_for(lambda alert: alert["labels"].get("alertname") == "NoisyNeighbor", timeout=120)
        except TimeoutError:
            pass  # the tests below report what is missing
        time.sleep(SETTLE_SECONDS)
        received = stack.receiver.alerts()
        print(stack.exporter_log_tail())
    return simulation, received


def firing(received, alertname: str) -> set[str]:
    return {alert["labels"].get("namespace") for alert in received
            if alert["labels"].get("alertname") == alertname and alert["status"] == "firing"}


def test_anomalous_tenants_alert(alerts):
    simulation, received = alerts
    expected = active_at(simulation, simulation.timestamps[-1])
    assert expected == {"t03", "t05", "t08", "t11", "t14"}
    assert firing(received, "AnomalyDetected") >= expected


def test_clean_tenants_silent(alerts):
    simulation, received = alerts
    anomalous = {a.tenant for a in simulation.anomalies}
    assert firing(received, "AnomalyDetected") - anomalous == set()


def test_noisy_neighbour_alert_names_node(alerts):
    simulation, received = alerts
    noisy = [alert for alert in received
             if alert["labels"].get("alertname") == "NoisyNeighbor" and alert["status"] == "firing"]
    assert {(alert["labels"]["namespace"], alert["labels"]["node"]) for alert in noisy} == {("t05", simulation.node["t05"])}


def test_critical_tier_reaches_exhausted_tenant(alerts):
    _, received = alerts
    severities = {alert["labels"]["severity"] for alert in received
                  if alert["labels"].get("alertname") == "AnomalyDetected" and alert["labels"].get("namespace") == "t03"}
    assert "critical" in severities
