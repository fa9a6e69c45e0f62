"""``anomaly-exporter run`` without TensorFlow: the detectors that do not need it still serve.

The exporter runs in a subprocess whose first import step rejects ``tensorflow`` and
``keras`` as if they were not installed. It reads a real Prometheus with a day or two of
history ending now, and has three detectors: a seasonal one, an equipment one with control
limits, and an equipment one with the autoencoder. The first two must put their scores on
/metrics. The third must fail its fit with the install hint, and must leave the other two alone.

The same module passes in a virtualenv without the tensorflow extra, where the import step
has nothing to reject.
"""

import re
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from detectors._autoencoder import TENSORFLOW_MISSING
from conftest import BLOCKED_RUN
from exporter.demo.stack import Series

pytestmark = pytest.mark.stack

START_TIMEOUT = 60.0
SCORE_TIMEOUT = 60.0
HOSTS = ("h1", "h2", "h3")
PUMPS = ("p1", "p2")



def history(now: float) -> list[Series]:
    rng = np.random.default_rng(11)
    series = []
    minutes = np.arange(now - 2 * 86400, now - 30, 60.0)
    for index, host in enumerate(HOSTS):
        daily = 0.4 + 0.2 * np.sin(2 * np.pi * minutes / 86400 + index)
        series.append(Series("host_cpu_utilisation_ratio", {"host": host}, minutes, daily + rng.normal(0, 0.01, minutes.size)))
    quarter_minutes = np.arange(now - 86400, now - 30, 15.0)
    for pump in PUMPS:
        temperature = 55 + rng.normal(0, 0.3, quarter_minutes.size)
        current = 12 + rng.normal(0, 0.2, quarter_minutes.size)
        series.append(Series("pump_motor_temperature_celsius", {"equipment": pump}, quarter_minutes, temperature))
        series.append(Series("pump_motor_current_amperes", {"equipment": pump}, quarter_minutes, current))
    return series


def exporter_config(prometheus_url: str) -> dict:
    pump_queries = {
        "temperature": "max by (equipment) (pump_motor_temperature_celsius)",
        "current": "max by (equipment) (pump_motor_current_amperes)",
    }
    timing = {"step": "15s", "fit_window": "1d", "fit_every": "1h", "score_every": "5s", "stale_after": "1h"}
    return {
        "source": {"url": prometheus_url, "query_delay": "0s", "max_retries": 0, "timeout": "10s"},
        "listen_address": "127.0.0.1:0",
        "detectors": [
            {"name": "host_cpu", "type": "seasonal", "query": "host_cpu_utilisation_ratio", "entity_labels": ["host"],
             "params": {"min_history": "1d"}, **timing, "step": "1m", "fit_window": "2d"},
            {"name": "pumps", "type": "equipment", "queries": pump_queries, "entity_labels": ["equipment"],
             "params": {"method": "limits"}, **timing},
            {"name": "pumps_autoencoder", "type": "equipment", "queries": pump_queries, "entity_labels": ["equipment"],
             "params": {"method": "autoencoder"}, **timing},
        ],
    }


def scores_by_detector(text: str) -> dict[str, set[str]]:
    """Return the entities with an anomaly_score on /metrics, per detector."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "anomaly_score":
                found.setdefault(sample.labels["detector"], set()).add(sample.labels["entity"])
    return found


def sample_value(text: str, name: str, **labels) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


@pytest.fixture
def running_exporter(start_prometheus, tmp_path):
    """Start the exporter with TensorFlow rejected; return (metrics URL, a function returning its log)."""
    prometheus = start_prometheus(history(time.time()))
    config_path = tmp_path / "exporter.yml"
    config_path.write_text(yaml.safe_dump(exporter_config(prometheus.url), sort_keys=False), encoding="utf-8")
    log_path = tmp_path / "exporter.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", BLOCKED_RUN, "run", "--config", str(config_path), "--log-level", "info"],
            stdout=subprocess.DEVNULL, stderr=log_file,
        )

    def log() -> str:
        return log_path.read_text(encoding="utf-8", errors="replace")

    try:
        deadline = time.monotonic() + START_TIMEOUT
        match = None
        while match is None and time.monotonic() < deadline:
            assert process.poll() is None, f"exporter exited with {process.returncode}:\n{log()}"
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", log())
            time.sleep(0.1)
        assert match is not None, f"exporter did not log its address within {START_TIMEOUT:g}s:\n{log()}"
        yield f"http://127.0.0.1:{match.group(1)}", log
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_exporter_serves_scores_without_tensorflow(running_exporter):
    url, log = running_exporter
    expected = {
        "host_cpu": {f"host={host}" for host in HOSTS},
        "pumps": {f"equipment={pump}" for pump in PUMPS},
    }
    deadline = time.monotonic() + SCORE_TIMEOUT
    text = requests.get(f"{url}/metrics", timeout=10).text
    while not all(entities <= scores_by_detector(text).get(name, set()) for name, entities in expected.items()):
        assert time.monotonic() < deadline, f"scores missing after {SCORE_TIMEOUT:g}s:\n{text}\n{log()}"
        time.sleep(0.5)
        text = requests.get(f"{url}/metrics", timeout=10).text

    scores = scores_by_detector(text)
    assert scores["host_cpu"] == expected["host_cpu"]
    assert scores["pumps"] == expected["pumps"]
    assert "pumps_autoencoder" not in scores
    assert sample_value(text, "anomaly_exporter_runs_total", detector="pumps_autoencoder", phase="fit",
                        result="failure") >= 1
    assert sample_value(text, "anomaly_exporter_runs_total", detector="pumps", phase="fit", result="success") >= 1
    assert TENSORFLOW_MISSING in log()
    assert requests.get(f"{url}/-/ready", timeout=10).status_code == 200
