"""Sharding: the entity hash, the shard settings, and results that do not depend on the shard count."""

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import Exporter
from exporter.config import parse_config
from exporter.job import DetectorJob, series_key
from exporter.metrics import SelfMetrics
from exporter.sharding import (
    COUNT_VARIABLE,
    INDEX_VARIABLE,
    Shard,
    ShardError,
    entity_shard,
    resolve_shard,
)
from exporter.source import Panel, grid
from exporter.store import StateStore

STEP = 300.0
DAY = 86400.0
# A Monday 00:00 UTC.
START = 1_767_571_200.0
FIT_END = START + 3 * DAY - STEP
SCORE_END = FIT_END + 2 * 3600.0
TENANTS = [f"tenant-{i:02d}" for i in range(15)]
METRICS = ("cpu", "memory")


# entity_shard -----------------------------------------------------------------------------


def test_hash_pinned():
    # Changing the hash moves entities between shards on upgrade, so its output is pinned.
    assert entity_shard({"namespace": "shop"}, ["namespace"], 1_000_003) == 538_224


def test_hash_ignores_label_order():
    labels = {"host": "db1", "disk": "sda"}

    assert entity_shard(labels, ["host", "disk"], 97) == entity_shard(labels, ["disk", "host"], 97)


def test_hash_ignores_other_labels():
    cpu = {"namespace": "shop", "metric": "cpu"}
    memory = {"namespace": "shop", "metric": "memory"}

    assert entity_shard(cpu, ["namespace"], 97) == entity_shard(memory, ["namespace"], 97)


def test_hash_all_labels_without_entity_labels():
    first = {"namespace": "shop", "metric": "cpu"}
    second = {"namespace": "shop", "metric": "memory"}

    shards = {entity_shard(labels, [], 1_000_003) for labels in (first, second)}

    assert len(shards) == 2


def test_hash_separates_names_and_values():
    joined = {"a": "b=c"}
    split = {"a=b": "c"}

    assert entity_shard(joined, [], 1_000_003) != entity_shard(split, [], 1_000_003)


def test_hash_spreads_entities():
    counts = np.bincount([entity_shard({"namespace": f"ns-{i}"}, ["namespace"], 3) for i in range(3000)])

    assert counts.min() > 900
    assert counts.max() < 1100


def test_single_shard_owns_all():
    assert Shard().owns({"namespace": "shop"}, ["namespace"])


# Shard and resolve_shard ------------------------------------------------------------------


@pytest.mark.parametrize(("index", "count"), [(0, 0), (-1, 3), (3, 3)])
def test_shard_rejects_invalid(index, count):
    with pytest.raises(ShardError, match="invalid shard"):
        Shard(index, count)


def test_resolve_defaults():
    assert resolve_shard(None, None, {}) == Shard(0, 1)


def test_resolve_single_shard_ignores_hostname():
    assert resolve_shard(None, None, {"HOSTNAME": "build-host-7"}) == Shard(0, 1)


def test_resolve_from_flags():
    environ = {INDEX_VARIABLE: "0", COUNT_VARIABLE: "5", "HOSTNAME": "anomaly-exporter-4"}

    assert resolve_shard(2, 3, environ) == Shard(2, 3)


def test_resolve_from_environment():
    environ = {INDEX_VARIABLE: " 1 ", COUNT_VARIABLE: "4", "HOSTNAME": "anomaly-exporter-3"}

    assert resolve_shard(None, None, environ) == Shard(1, 4)


def test_resolve_from_pod_ordinal():
    environ = {COUNT_VARIABLE: "4", "HOSTNAME": "my-release-anomaly-exporter-3"}

    assert resolve_shard(None, None, environ) == Shard(3, 4)


def test_resolve_empty_variables_ignored():
    environ = {INDEX_VARIABLE: "", COUNT_VARIABLE: "", "HOSTNAME": "anomaly-exporter-2"}

    assert resolve_shard(None, None, environ) == Shard(0, 1)


def test_resolve_hostname_without_ordinal():
    with pytest.raises(ShardError, match="shard index missing for 3 shards"):
        resolve_shard(None, 3, {"HOSTNAME": "laptop"})


def test_resolve_ordinal_out_of_range():
    with pytest.raises(ShardError, match=f"set {COUNT_VARIABLE}"):
        resolve_shard(None, 3, {"HOSTNAME": "anomaly-exporter-3"})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({COUNT_VARIABLE: "three"}, f"invalid {COUNT_VARIABLE} 'three'"),
        ({COUNT_VARIABLE: "0"}, f"invalid {COUNT_VARIABLE} '0'"),
        ({COUNT_VARIABLE: "3", INDEX_VARIABLE: "-1"}, f"invalid {INDEX_VARIABLE} '-1'"),
        ({COUNT_VARIABLE: "3", INDEX_VARIABLE: "3"}, "invalid shard index 3 for 3 shards"),
    ],
)
def test_resolve_rejects_environment(environ, message):
    with pytest.raises(ShardError, match=re.escape(message)):
        resolve_shard(None, None, environ)


# Results do not depend on the shard count ------------------------------------------------


class TenantSource:
    """A stand-in for PrometheusSource: two daily series per tenant, tenant-04's cpu spikes."""

    def __init__(self, config):
        self.config = config
        self.up = True

    def query_range(self, query, start, end, step):
        timestamps = grid(start, end, step)
        labels = [{"tenant": tenant, "metric": metric} for tenant in TENANTS for metric in METRICS]
        phases = np.linspace(0.0, 3.0, len(labels))[:, None]
        values = 50.0 + 10.0 * np.sin(2 * np.pi * timestamps / DAY + phases)
        # The noise depends only on the timestamp and the row, so every query agrees.
        noise = np.array([np.random.default_rng(int(t)).normal(0, 0.5, len(labels)) for t in timestamps]).T
        values = values + noise.reshape(len(labels), timestamps.size)
        values[TENANTS.index("tenant-04") * len(METRICS), timestamps > SCORE_END - 3 * STEP] += 40.0
        return Panel(values, timestamps, labels)


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def tenant_config():
    return parse_config(
        {
            "source": {"url": "http://127.0.0.1:9", "query_delay": "0s"},
            "detectors": [
                {
                    "name": "tenants",
                    "query": "tenant_usage",
                    "type": "seasonal",
                    "step": "5m",
                    "fit_window": "3d",
                    "entity_labels": ["tenant"],
                    "params": {"min_history": "1d"},
                }
            ],
        }
    )


def scored_series(shard: Shard) -> dict[tuple, tuple]:
    """Fit and score one shard's job, and return the published values of each series by its label set."""
    config = tenant_config()
    clock = Clock(FIT_END)
    job = DetectorJob(
        config.detectors[0],
        TenantSource(config.source),
        StateStore(None),
        SelfMetrics(CollectorRegistry()),
        clock=clock,
        shard=shard,
    )
    job.fit()
    clock.now = SCORE_END
    job.score()
    snapshot = job.snapshot
    return {
        series_key(labels): (
            snapshot.score[i],
            snapshot.expected[i],
            snapshot.lower[i],
            snapshot.upper[i],
            snapshot.ready[i],
        )
        for i, labels in enumerate(snapshot.labels)
    }


@pytest.fixture(scope="module")
def single_shard():
    return scored_series(Shard(0, 1))


@pytest.fixture(scope="module")
def three_shards():
    return [scored_series(Shard(index, 3)) for index in range(3)]


def test_single_shard_scores_everything(single_shard):
    assert len(single_shard) == len(TENANTS) * len(METRICS)


def test_single_shard_sees_spike(single_shard):
    spiked = {key: values for key, values in single_shard.items() if ("tenant", "tenant-04") in key}
    cpu = [values for key, values in spiked.items() if ("metric", "cpu") in key][0]

    assert cpu[0] >= 2


def test_every_shard_has_series(three_shards):
    for series in three_shards:
        assert series


def test_shards_disjoint(three_shards):
    total = sum(len(series) for series in three_shards)
    union = set().union(*three_shards)

    assert len(union) == total


def test_shard_union_equals_single(single_shard, three_shards):
    union = set().union(*three_shards)

    assert union == set(single_shard)


def test_shard_scores_identical(single_shard, three_shards):
    for series in three_shards:
        for key, values in series.items():
            expected = np.array(single_shard[key][:4])
            assert np.array_equal(np.array(values[:4]), expected, equal_nan=True), key
            assert values[4] == single_shard[key][4], key


def test_scores_are_finite(three_shards):
    scores = [values[0] for series in three_shards for values in series.values()]

    assert np.isfinite(scores).all()


def test_entity_stays_on_one_shard(three_shards):
    for tenant in TENANTS:
        owners = [index for index, series in enumerate(three_shards) if any(("tenant", tenant) in key for key in series)]
        assert len(owners) == 1, tenant


# Self-metrics and the command line --------------------------------------------------------


def gauge_value(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(name)


def test_metrics_default_shard():
    registry = CollectorRegistry()
    SelfMetrics(registry)

    assert gauge_value(registry, "anomaly_exporter_shard_index") == 0
    assert gauge_value(registry, "anomaly_exporter_shard_count") == 1


def test_exporter_sets_shard_gauges():
    config = tenant_config()
    exporter = Exporter("exporter.yml", config, Shard(2, 3))

    assert gauge_value(exporter.registry, "anomaly_exporter_shard_index") == 2
    assert gauge_value(exporter.registry, "anomaly_exporter_shard_count") == 3


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "exporter.yml"
    data = {
        "source": {"url": "http://127.0.0.1:9", "max_retries": 0, "timeout": "2s"},
        "listen_address": "127.0.0.1:0",
        "detectors": [{"name": "cpu", "query": "cpu_usage", "type": "seasonal", "fit_window": "1h"}],
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def cli_environment(**variables: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in (INDEX_VARIABLE, COUNT_VARIABLE, "HOSTNAME")}
    environ.update(variables)
    return environ


def run_cli(args: list[str], environ: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args], capture_output=True, text=True, env=environ, timeout=60
    )


def test_cli_missing_index(tmp_path):
    config = write_config(tmp_path)

    result = run_cli(["run", "--config", str(config), "--shard-count", "3"], cli_environment(HOSTNAME="laptop"))

    assert result.returncode == 2
    assert "shard index missing for 3 shards" in result.stderr


def test_cli_index_out_of_range(tmp_path):
    config = write_config(tmp_path)

    result = run_cli(["run", "--config", str(config), "--shard-index", "3", "--shard-count", "3"], cli_environment())

    assert result.returncode == 2
    assert "invalid shard index 3 for 3 shards" in result.stderr


def test_cli_exposes_pod_ordinal(tmp_path):
    # The index comes from HOSTNAME, as in a StatefulSet pod; the count from the environment.
    config = write_config(tmp_path)
    log_path = tmp_path / "exporter.log"
    environ = cli_environment(HOSTNAME="anomaly-exporter-1", **{COUNT_VARIABLE: "2"})
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "exporter", "run", "--config", str(config), "--duration", "60s"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environ,
        )
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline and process.poll() is None:
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())
            port = int(match.group(1)) if match else None
            time.sleep(0.2)
        assert port is not None, log_path.read_text()

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        process.terminate()
        process.wait(timeout=30)
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("anomaly_exporter_shard_")
    }

    assert samples == {"anomaly_exporter_shard_index": 1.0, "anomaly_exporter_shard_count": 2.0}
    assert "shard 1 of 2" in log_path.read_text()
