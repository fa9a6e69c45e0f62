"""Backtest: streaming replay, refit cadence, CSV source and the command's outputs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from exporter.backtest import fit_times, parse_time, replay
from exporter.config import DetectorConfig
from exporter.csvsource import CsvSource
from exporter.demo.stack import find_binary
from exporter.source import QueryError

ROOT = Path(__file__).resolve().parents[1]
STEP = 300.0
DAY = 86400.0
START = 1_767_571_200.0  # a Monday, 00:00 UTC
SPIKE_AT = START + 5 * DAY + 13 * 3600


def seasonal_frame(seed: int, spike: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    times = START + np.arange(0, 6 * DAY, STEP)
    values = 50 + 20 * np.sin(2 * np.pi * times / DAY) + rng.normal(0, 1, times.size)
    values[np.argmin(np.abs(times - SPIKE_AT))] += spike
    stamps = pd.to_datetime(times, unit="s", utc=True).strftime("%Y-%m-%d %H:%M:%S")
    return pd.DataFrame({"timestamp": stamps, "value": values})


def detector(**overrides) -> DetectorConfig:
    settings = {"name": "bt", "query": ".*", "type": "seasonal", "entity_labels": ["series"],
                "step": "5m", "fit_window": "3d", "fit_every": "6h", "params": {"min_history": "1d"}}
    settings.update(overrides)
    return DetectorConfig.model_validate(settings)


@pytest.fixture
def csv_folder(tmp_path):
    seasonal_frame(1, spike=25.0).to_csv(tmp_path / "spiky.csv", index=False)
    seasonal_frame(2).to_csv(tmp_path / "clean.csv", index=False)
    return tmp_path


def test_spike_found_clean_quiet(csv_folder):
    source = CsvSource(str(csv_folder / "*.csv"))
    result = replay(detector(), source, START + DAY, START + 6 * DAY)
    rows = {labels["series"]: index for index, labels in enumerate(result.labels)}
    at_spike = np.argmin(np.abs(result.timestamps - SPIKE_AT))
    assert result.score[rows["spiky"], at_spike] >= 2
    clean = result.score[rows["clean"]]
    assert np.nanmean(clean >= 1) < 0.01


def test_future_data_does_not_change_past_scores(csv_folder):
    source = CsvSource(str(csv_folder / "*.csv"))
    before = replay(detector(), source, START + DAY, START + 6 * DAY)

    changed = seasonal_frame(2)
    changed.loc[changed.index[-200:], "value"] += 1000.0
    changed.to_csv(csv_folder / "clean.csv", index=False)
    after = replay(detector(), CsvSource(str(csv_folder / "*.csv")), START + DAY, START + 6 * DAY)

    first_changed = pd.Timestamp(changed["timestamp"].iloc[-200], tz="UTC").timestamp()
    past = before.timestamps < first_changed
    row = [labels["series"] for labels in before.labels].index("clean")
    assert np.allclose(before.score[row, past], after.score[row, past], equal_nan=True)
    assert np.nanmax(after.score[row, ~past]) >= 2


def test_refits_follow_fit_every(csv_folder):
    source = CsvSource(str(csv_folder / "*.csv"))
    result = replay(detector(fit_every="12h"), source, START + 2 * DAY, START + 4 * DAY)
    assert result.fits == 4
    assert len(fit_times(0.0, 86400.0, 3600.0)) == 24


def test_cold_start_not_scored(csv_folder):
    source = CsvSource(str(csv_folder / "*.csv"))
    result = replay(detector(params={"min_history": "2d"}), source, START, START + 3 * DAY)
    first_day = result.timestamps < START + DAY
    assert np.all(np.isnan(result.score[:, first_day]))
    assert np.any(~np.isnan(result.score))


def test_csv_quirks_handled(tmp_path):
    text = "timestamp,value\n2026-01-05 00:00:00,1\n2026-01-05 00:10:00,3\n2026-01-05 00:05:00,2\n2026-01-05 00:10:00,4"
    (tmp_path / "quirky.csv").write_text(text)
    source = CsvSource(str(tmp_path / "quirky.csv"))
    start = pd.Timestamp("2026-01-05", tz="UTC").timestamp()
    panel = source.query_range(".*", start, start + 900, 300)
    assert panel.values.tolist() == [[1.0, 2.0, 4.0, 4.0]]


@pytest.mark.parametrize("text, expected", [
    ("1767571200", 1_767_571_200.0),
    ("2026-01-05T00:00:00Z", 1_767_571_200.0),
    ("now", 2_000_000_000.0),
    ("now-1d", 2_000_000_000.0 - DAY),
])
def test_time_forms(text, expected):
    assert parse_time(text, now=2_000_000_000.0) == expected


def test_time_invalid():
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_time("yesterday-ish", now=0.0)


def test_command_outputs(csv_folder, tmp_path):
    config = {
        "source": {"csv": {"path": str(csv_folder / "*.csv")}},
        "detectors": [detector().model_dump(mode="json") | {
            "step": "5m", "fit_window": "3d", "fit_every": "6h", "score_every": "1m", "stale_after": "10m"}],
    }
    config_path = tmp_path / "backtest.yml"
    config_path.write_text(yaml.safe_dump(config))
    labels = tmp_path / "labels.json"
    spike = pd.Timestamp(SPIKE_AT, unit="s", tz="UTC")
    labels.write_text(json.dumps({"spiky": [[str(spike - pd.Timedelta("30min")), str(spike + pd.Timedelta("30min"))]]}))
    output = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "exporter", "backtest", "--config", str(config_path), "--output", str(output),
         "--labels", str(labels), "--openmetrics", "--from", str(START + DAY), "--quiet"],
        capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 0, completed.stderr
    frame = pd.read_csv(output / "scores.csv")
    assert set(frame["entity"]) == {"series=spiky", "series=clean"}
    assert frame["score"].notna().all()
    page = (output / "report.html").read_text()
    assert "series=spiky" in page
    assert (output / "plot-000.png").stat().st_size > 1000

    # The OpenMetrics file is accepted by promtool, so past scores can be backfilled.
    blocks = tmp_path / "blocks"
    promtool = find_binary("promtool")
    backfill = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(output / "scores.om"), str(blocks)],
                              capture_output=True, text=True, timeout=300)
    assert backfill.returncode == 0, backfill.stdout + backfill.stderr
    assert any(blocks.iterdir())


def test_command_rejects_bad_range(csv_folder, tmp_path):
    config_path = tmp_path / "backtest.yml"
    config_path.write_text(yaml.safe_dump({
        "source": {"csv": {"path": str(csv_folder / "*.csv")}},
        "detectors": [{"name": "bt", "query": ".*", "type": "seasonal", "step": "5m"}],
    }))
    completed = subprocess.run(
        [sys.executable, "-m", "exporter", "backtest", "--config", str(config_path), "--from", "2026-02-01",
         "--to", "2026-01-01", "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 2
    assert "is not at least one step after the start" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_run_rejects_csv_source(csv_folder, tmp_path):
    config_path = tmp_path / "backtest.yml"
    config_path.write_text(yaml.safe_dump({
        "source": {"csv": {"path": str(csv_folder / "*.csv")}},
        "detectors": [{"name": "bt", "query": ".*", "type": "seasonal"}],
    }))
    completed = subprocess.run(
        [sys.executable, "-m", "exporter", "run", "--config", str(config_path)],
        capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 2
    assert "source.url" in completed.stderr


def test_failing_detector_keeps_others(csv_folder, tmp_path):
    config_path = tmp_path / "backtest.yml"
    config_path.write_text(yaml.safe_dump({
        "source": {"csv": {"path": str(csv_folder / "*.csv")}},
        "detectors": [
            {"name": "good", "query": "spiky", "type": "seasonal", "step": "5m", "fit_window": "3d",
             "fit_every": "12h", "params": {"min_history": "1d"}},
            {"name": "bad", "query": "([", "type": "seasonal", "step": "5m"},
        ],
    }))
    output = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "exporter", "backtest", "--config", str(config_path), "--output", str(output),
         "--from", str(START + DAY), "--to", str(START + 3 * DAY), "--no-report", "--quiet"],
        capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 1
    assert "bad failed" in completed.stderr
    frame = pd.read_csv(output / "scores.csv")
    assert set(frame["detector"]) == {"good"}


def test_static_label_collision_dropped(csv_folder):
    from prometheus_client import CollectorRegistry

    from exporter.job import DetectorJob
    from exporter.metrics import SelfMetrics
    from exporter.store import StateStore

    registry = CollectorRegistry()
    config = detector(entity_labels=["column"], labels={"series": "merged"})
    job = DetectorJob(config, CsvSource(str(csv_folder / "*.csv")), StateStore(None), SelfMetrics(registry))
    panel = job.query(START, START + DAY, "fit")
    assert len(panel.labels) == 1
    dropped = registry.get_sample_value(
        "anomaly_exporter_series_dropped_total", {"detector": "bt", "reason": "label_collision"})
    assert dropped == 1


def test_csv_milliseconds_rejected(tmp_path):
    (tmp_path / "ms.csv").write_text("timestamp,value\n1767571200000,1\n1767571500000,2\n")
    with pytest.raises(QueryError, match="milliseconds"):
        CsvSource(str(tmp_path / "ms.csv"))


def test_csv_header_only_rejected(tmp_path):
    (tmp_path / "empty.csv").write_text("timestamp,value\n")
    with pytest.raises(QueryError, match="no data rows"):
        CsvSource(str(tmp_path / "empty.csv"))


def test_query_selecting_nothing_fails(csv_folder):
    source = CsvSource(str(csv_folder / "*.csv"))
    with pytest.raises(ValueError, match="selected no series"):
        replay(detector(query="nothing_like_this"), source, START + DAY, START + 2 * DAY)


def test_csv_text_values_warned(tmp_path, caplog):
    (tmp_path / "mixed.csv").write_text("timestamp,value\n1767571200,1\n1767571500,oops\n")
    with caplog.at_level("WARNING", logger="exporter.csvsource"):
        CsvSource(str(tmp_path / "mixed.csv"))
    assert any("not numbers" in record.getMessage() for record in caplog.records)
