"""End to end on real processes: backfilled Prometheus, the exporter, the rules, Alertmanager.

One scenario, in order. History is backfilled, the exporter fits and scores, and an anomaly is
injected into one live host. The webhook receives its warning and then its critical alert,
and nothing for the clean hosts. Then Prometheus goes away and comes back while /metrics
keeps responding.
"""

import dataclasses
import re
import time
from pathlib import Path

import pytest
import requests
import yaml

from exporter.demo.simulator import LiveServer, Simulator, default_series
from exporter.demo.stack import AlertingStack, backfill_series
from rules.render import RuleParameters, render_rule_groups

ROOT = Path(__file__).resolve().parents[1]
HOSTS = ("h1", "h2", "h3", "h4")
TARGET_HOST = "h2"
CPU_METRIC = "demo_host_cpu_utilisation_ratio"
STALE_SECONDS = 40

pytestmark = pytest.mark.stack

FAST_RULES = RuleParameters(
    evaluation_interval="1s",
    warning_for="5s",
    critical_for="20s",
    escalation_window="10m",
    source_down_for="5s",
)


def host_cpu_simulator() -> Simulator:
    # The history is 3.5 days back from now, too short to learn h1's weekend dip, so on a
    # Saturday or Sunday afternoon the dip itself would alert. The hosts here keep weekdays.
    series = [
        dataclasses.replace(s, weekend_factor=1.0)
        for s in default_series() if s.metric == CPU_METRIC and s.labels.get("host") in HOSTS
    ]
    return Simulator(series, anomalies=(), seed=3)


def exporter_config(state_dir: Path) -> dict:
    return {
        "source": {"query_delay": "0s", "timeout": "2s", "max_retries": 1},
        "state_dir": str(state_dir),
        "detectors": [
            {
                "name": "host_cpu",
                "query": CPU_METRIC,
                "entity_labels": ["host"],
                "type": "seasonal",
                # The simulator keeps each noise draw for 15 s, so three 5 s points share one draw and a
                # 3-sigma band gives a clean host a lasting crossing in about 1 of 370 buckets,
                # enough to fail this test now and then. At 4 sigma it is about 1 in 16,000,
                # and the injected shift of 15 sigma still crosses the critical edge of 8.
                "params": {"min_history": "1d", "band_sigmas": 4},
                "fit_window": "3d",
                "fit_every": "1h",
                "score_every": "2s",
                "step": "5s",
                "stale_after": f"{STALE_SECONDS}s",
            }
        ],
    }


def scrape(url: str) -> tuple[float, str]:
    started = time.monotonic()
    text = requests.get(url, timeout=5).text
    return time.monotonic() - started, text


def samples(text: str, metric: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        match = re.match(rf"{metric}(?:\{{(.*)\}})? (\S+)$", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


def wait_until(condition, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except requests.ConnectionError as error:
            last = error
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last value: {last!r}")


@pytest.fixture
def stack(tmp_path):
    """History in Prometheus, Alertmanager with a webhook, and the exporter running."""
    now = time.time()
    simulator = host_cpu_simulator()
    live = LiveServer(simulator)
    history = list(simulator.history(now - 3.5 * 86400, now - 30, 60.0, job="demo", instance=live.target))
    backfill_series(history, tmp_path / "tsdb")
    inhibit_rules = yaml.safe_load((ROOT / "examples/alertmanager/alertmanager.yml").read_text())["inhibit_rules"]
    alerting = AlertingStack(
        tmp_path, tsdb=tmp_path / "tsdb", simulator_target=live.target, rule_groups=render_rule_groups(FAST_RULES),
        exporter_config=exporter_config(tmp_path / "state"), inhibit_rules=inhibit_rules,
    )
    try:
        with alerting:
            yield {
                "live": live, "receiver": alerting.receiver, "prometheus": alerting.prometheus,
                "alertmanager": alerting.alertmanager, "metrics_url": alerting.metrics_url,
                "log": alerting.log_path, "exporter": alerting.exporter,
            }
    finally:
        live.stop()
        print(alerting.exporter_log_tail())


def anomaly_alerts(receiver) -> list[dict]:
    return [a for a in receiver.alerts() if a["labels"].get("alertname") == "AnomalyDetected"]


def test_alert_tiers_then_outage(stack):
    receiver, live, metrics_url = stack["receiver"], stack["live"], stack["metrics_url"]

    # Every host gets a ready model and a score within a minute of start.
    def all_scored():
        _, text = scrape(metrics_url)
        scores = samples(text, "anomaly_score")
        return len(scores) == len(HOSTS) and scores

    scores = wait_until(all_scored, 60, "a score for every host")
    assert all(value < 1 for value in scores.values()), f"clean hosts score high before injection: {scores}"

    # Quiet period: the clean hosts raise nothing.
    time.sleep(15)
    assert anomaly_alerts(receiver) == []

    live.inject({"host": TARGET_HOST}, metric=CPU_METRIC, kind="level_shift", magnitude=15.0, duration=None)
    warning = receiver.wait_for(
        lambda a: a["labels"].get("alertname") == "AnomalyDetected" and a["labels"].get("severity") == "warning"
        and a["status"] == "firing", timeout=90)
    critical = receiver.wait_for(
        lambda a: a["labels"].get("alertname") == "AnomalyDetected" and a["labels"].get("severity") == "critical"
        and a["status"] == "firing", timeout=90)
    assert warning[0]["labels"]["entity"] == f"host={TARGET_HOST}"
    assert critical[0]["labels"]["entity"] == f"host={TARGET_HOST}"
    assert warning[0]["startsAt"] <= critical[0]["startsAt"]
    assert critical[0]["labels"]["detector"] == "host_cpu"
    assert critical[0]["annotations"]["runbook_url"].endswith("/anomaly-detected.md")
    assert "host%3Dh2" in critical[0]["annotations"]["dashboard_url"]
    other_entities = {a["labels"].get("entity") for a in anomaly_alerts(receiver)} - {f"host={TARGET_HOST}"}
    assert other_entities == set()

    # Prometheus goes away: /metrics still responds at once, reports the source down and,
    # once the input is stale, exposes no scores.
    prometheus = stack["prometheus"]
    with prometheus.stopped():
        wait_until(lambda: samples(scrape(metrics_url)[1], "anomaly_exporter_source_up").get("") == 0.0,
                   30, "anomaly_exporter_source_up 0")
        elapsed, _ = scrape(metrics_url)
        assert elapsed < 1.0
        wait_until(lambda: not samples(scrape(metrics_url)[1], "anomaly_score"), STALE_SECONDS + 30,
                   "stale scores to disappear")
        elapsed, text = scrape(metrics_url)
        assert elapsed < 1.0
        assert samples(text, "anomaly_model_ready") == {}
        assert stack["exporter"].poll() is None

    # Back again: the source is up and every host is scored once more.
    wait_until(lambda: samples(scrape(metrics_url)[1], "anomaly_exporter_source_up").get("") == 1.0,
               60, "anomaly_exporter_source_up 1")
    scores = wait_until(all_scored, 60, "scores after the source returned")
    assert scores[next(k for k in scores if f'host="{TARGET_HOST}"' in k)] >= 1
