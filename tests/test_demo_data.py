"""Tests of the demo data: the NAB loader and the tenant, host and equipment simulator."""

import json
import re
import socket

import numpy as np
import pandas as pd
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import load_config
from exporter.demo import nab
from exporter.demo.run import DEMO_CONFIG, TENANT_HISTORY_STEP
from exporter.demo.simulator import (
    AFFECTED_TENANTS,
    BAND_FREQUENCIES_HZ,
    EQUIPMENT_BAND,
    NODE_CPU,
    NOISY_NODE,
    NOISY_TENANT,
    TENANT_CPU,
    TENANT_DETECTOR_METRICS,
    TENANT_LATENCY,
    TENANT_MEMORY,
    TENANT_PODS,
    TENANT_REQUESTS,
    TENANTS,
    Anomaly,
    CosineShape,
    LiveServer,
    SeriesSpec,
    Simulator,
    WindowShape,
    default_anomalies,
    default_series,
    default_simulator,
    imbalance,
    noisy_neighbour_episode,
    order_band,
)

NOW = 1_750_000_000.0  # a fixed "now" so the tests do not depend on the clock
H2_CPU = "demo_host_cpu_utilisation_ratio"


# --- NAB loader --------------------------------------------------------------------------------


def write_csv(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode())
    return path


QUIRKY_CSV = (
    "timestamp,value\n"
    "2014-03-09 01:00:00,1.0\n"
    "2014-03-09 01:05:00,2.0\n"
    "2014-03-09 01:05:00,2.5\n"  # duplicate timestamp: this later row must win
    "2014-03-09 01:20:00,3.0\n"  # 15-minute gap
    "2014-03-09 01:10:00,4.0\n"  # step backwards
    "\n"
    "not a time,5.0\n"
    "2014-03-09 01:25:00,\n"
    "2014-03-09 01:30:00,6.0"  # no final newline
)


def test_nab_csv_quirks_cleaned(tmp_path):
    path = write_csv(tmp_path / "quirky.csv", QUIRKY_CSV)

    series, report = nab.read_nab_csv(path)

    assert list(series.index.strftime("%H:%M")) == ["01:00", "01:05", "01:10", "01:20", "01:30"]
    assert series["2014-03-09 01:05:00"] == 2.5
    assert series.index.is_monotonic_increasing
    assert series.index.is_unique
    assert report.rows_read == 8
    assert report.invalid_rows_dropped == 2
    assert report.duplicate_timestamps_dropped == 1
    assert report.backward_steps == 1
    assert report.missing_final_newline
    assert report.changed


def test_nab_csv_repeated_hour_keeps_last(tmp_path):
    # A clock that steps back one hour, as on a daylight-saving switch, repeats every timestamp.
    rows = [f"2014-11-02 01:{minute:02d}:00,{minute}" for minute in range(0, 60, 5)]
    repeated = [f"2014-11-02 01:{minute:02d}:00,{100 + minute}" for minute in range(0, 60, 5)]
    text = "timestamp,value\n" + "\n".join(rows + repeated + ["2014-11-02 02:00:00,200"]) + "\n"
    path = write_csv(tmp_path / "dst.csv", text)

    series, report = nab.read_nab_csv(path)

    assert len(series) == 13
    assert report.duplicate_timestamps_dropped == 12
    assert report.backward_steps == 1
    assert not report.missing_final_newline
    assert series.iloc[:12].tolist() == [100.0 + minute for minute in range(0, 60, 5)]


def test_nab_csv_gaps_reported(tmp_path):
    text = "timestamp,value\n2014-01-01 00:00:00,1\n2014-01-01 00:05:00,2\n2014-01-01 00:10:00,3\n2014-01-01 00:40:00,4\n"
    series, report = nab.read_nab_csv(write_csv(tmp_path / "gap.csv", text))

    assert len(series) == 4  # gaps are reported, not filled
    assert report.median_step_seconds == 300
    assert report.gaps == 1
    assert report.longest_gap_seconds == 1800
    assert not report.changed


def test_nab_csv_missing_column_rejected(tmp_path):
    path = write_csv(tmp_path / "bad.csv", "time,value\n2014-01-01 00:00:00,1\n")
    with pytest.raises(ValueError, match="missing column"):
        nab.read_nab_csv(path)


def make_data_dir(tmp_path, csv_text, windows):
    key = "realTest/test_series.csv"
    write_csv(tmp_path / key, csv_text)
    (tmp_path / nab.WINDOWS_FILE).write_text(json.dumps({key: windows}))
    spec = nab.NabFile(key=key, metric="nab_test", help="Test series.", default_cut="2014-03-09 01:20:00")
    return spec


def test_nab_shift_ends_at_requested_time(tmp_path):
    spec = make_data_dir(
        tmp_path,
        QUIRKY_CSV,
        [["2014-03-09 00:00:00.000000", "2014-03-09 00:30:00.000000"],
         ["2014-03-09 01:15:00.000000", "2014-03-09 01:45:00.000000"]],
    )
    end_time = NOW + 0.25

    series = nab.load_series(spec, end_time, cut=None, data_dir=tmp_path)

    assert series.timestamps[-1] == end_time
    assert np.diff(series.timestamps).tolist() == [300.0, 300.0, 600.0, 600.0]
    assert series.values.tolist() == [1.0, 2.5, 4.0, 3.0, 6.0]
    assert series.labels == {"job": "nab", "instance": "nab", "series": "test_series"}
    original_end = pd.Timestamp("2014-03-09 01:30:00").timestamp()
    assert series.shift_seconds == pytest.approx(end_time - original_end)
    window_start = pd.Timestamp("2014-03-09 01:15:00").timestamp() + series.shift_seconds
    assert series.windows[-1] == pytest.approx((window_start, window_start + 1800))


def test_nab_cut_drops_later_rows(tmp_path):
    spec = make_data_dir(tmp_path, QUIRKY_CSV, [["2014-03-09 01:15:00.000000", "2014-03-09 01:45:00.000000"]])

    series = nab.load_series(spec, NOW, data_dir=tmp_path)

    assert series.cut_at == pd.Timestamp("2014-03-09 01:20:00")
    assert series.values.tolist() == [1.0, 2.5, 4.0, 3.0]
    assert series.timestamps[-1] == NOW
    # The window that contains the cut keeps its end, 25 minutes after the new last point.
    assert series.windows == [pytest.approx((NOW - 300, NOW + 1500))]


def test_nab_cut_outside_file_rejected(tmp_path):
    spec = make_data_dir(tmp_path, QUIRKY_CSV, [])
    with pytest.raises(ValueError, match="outside the file's range"):
        nab.load_series(spec, NOW, cut="2015-01-01 00:00:00", data_dir=tmp_path)


def test_nab_unknown_stem_rejected():
    with pytest.raises(ValueError, match="unknown NAB file stem"):
        nab.load_series("nyc_taxi", NOW)


def test_nab_history_limit(tmp_path):
    spec = make_data_dir(tmp_path, QUIRKY_CSV, [["2014-03-09 00:00:00.000000", "2014-03-09 00:30:00.000000"]])

    series = nab.load_series(spec, NOW, cut=None, history_seconds=1200, data_dir=tmp_path)

    assert series.values.tolist() == [4.0, 3.0, 6.0]
    assert series.windows == []  # the only window lies before the rows kept


@pytest.mark.parametrize("stem", sorted(nab.NAB_FILES))
def test_bundled_nab_default_cut(stem):
    series = nab.load_series(stem, NOW)
    spec = nab.NAB_FILES[stem]

    assert series.metric == spec.metric
    assert series.labels["series"] == stem
    assert series.timestamps[-1] == NOW
    assert np.all(np.diff(series.timestamps) > 0)
    assert series.cut_at == pd.Timestamp(spec.default_cut)
    assert any(start <= NOW <= end for start, end in series.windows), "the default cut must lie in a labelled window"


def test_bundled_nab_windows_match_files():
    windows = nab.read_windows(nab.DATA_DIR / nab.WINDOWS_FILE)
    assert sorted(windows) == sorted(spec.key for spec in nab.NAB_FILES.values())
    assert (nab.DATA_DIR / "LICENSE.txt").read_text().startswith("Copyright")


def test_machine_temperature_repeat_fixed():
    series, report = nab.read_nab_csv(nab.DATA_DIR / nab.NAB_FILES["machine_temperature_system_failure"].key)
    assert report.duplicate_timestamps_dropped == 12
    assert report.backward_steps == 1
    assert series.index.is_unique


# --- simulator ---------------------------------------------------------------------------------


def history_by_key(simulator, start, end, step, job="demo", instance="sim:1"):
    return {
        (metric, tuple(sorted(labels.items()))): (timestamps, values)
        for metric, labels, timestamps, values in simulator.history(start, end, step, job=job, instance=instance)
    }


def test_simulator_history_deterministic():
    first = history_by_key(default_simulator(NOW, seed=7), NOW - 86400, NOW, 60)
    second = history_by_key(default_simulator(NOW, seed=7), NOW - 86400, NOW, 60)
    other_seed = history_by_key(default_simulator(NOW, seed=8), NOW - 86400, NOW, 60)

    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key][0], second[key][0])
        np.testing.assert_array_equal(first[key][1], second[key][1])
        assert not np.array_equal(first[key][1], other_seed[key][1])


def test_simulator_history_labels_and_grid():
    simulator = default_simulator(NOW)
    rows = list(simulator.history(NOW - 600, NOW, 60, job="demo-sim", instance="127.0.0.1:9999"))

    assert len(rows) == len(simulator.series)
    for metric, labels, timestamps, values in rows:
        assert labels["job"] == "demo-sim"
        assert labels["instance"] == "127.0.0.1:9999"
        assert timestamps[0] == NOW - 600
        assert timestamps[-1] == NOW
        assert len(timestamps) == len(values) == 11
        assert np.all(np.isfinite(values))


def test_simulator_history_chunks_join():
    simulator = default_simulator(NOW)
    whole = history_by_key(simulator, NOW - 7200, NOW, 60)
    early = history_by_key(simulator, NOW - 7200, NOW - 3600, 60)
    late = history_by_key(simulator, NOW - 3600, NOW, 60)

    for key, (timestamps, values) in whole.items():
        joined = np.concatenate([early[key][1], late[key][1][1:]])
        np.testing.assert_array_equal(joined, values)


def test_live_values_equal_history():
    simulator = default_simulator(NOW)
    history = history_by_key(simulator, NOW - 3600, NOW, 60, instance="x")
    clock = {"now": 0.0}
    with LiveServer(simulator, clock=lambda: clock["now"]) as server:
        for index in (0, 17, 60):
            clock["now"] = NOW - 3600 + 60 * index
            scraped = scrape(server)
            for (metric, labels), (timestamps, values) in history.items():
                entity = tuple(item for item in labels if item[0] not in ("job", "instance"))
                assert timestamps[index] == clock["now"]
                assert scraped[(metric, entity)] == values[index], (metric, entity, index)


def scrape(server):
    response = requests.get(server.url, timeout=5)
    response.raise_for_status()
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_live_server_serves_prometheus_text():
    simulator = default_simulator(NOW)
    with LiveServer(simulator, clock=lambda: NOW) as server:
        assert server.target.startswith("127.0.0.1:")
        response = requests.get(server.url, timeout=5)
        not_found = requests.get(f"http://{server.target}/other", timeout=5)
        families = {family.name: family for family in text_string_to_metric_families(response.text)}

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert not_found.status_code == 404
    assert set(families) == {spec.metric for spec in simulator.series}
    assert all(family.type == "gauge" for family in families.values())
    assert all(family.documentation for family in families.values())
    assert sum(len(family.samples) for family in families.values()) == len(simulator.series)


def test_live_server_binds_loopback_only():
    with LiveServer(default_simulator(NOW)) as server:
        bound = server._server.socket.getsockname()
        port = server.port
    assert bound[0] == "127.0.0.1"
    # After stop() the port is closed.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_inject_changes_only_target():
    simulator = Simulator(default_series(), seed=3)
    times = NOW + np.arange(-300, 900, 15.0)
    before = {spec.key: simulator.values(spec, times) for spec in simulator.series}
    with LiveServer(simulator, clock=lambda: NOW) as server:
        anomaly = server.inject({"host": "h2"}, metric=H2_CPU, kind="spike", magnitude=10, duration=600)
        during = {spec.key: simulator.values(spec, times) for spec in simulator.series}
        scraped = scrape(server)
        assert server.clear() == 1
    after = {spec.key: simulator.values(spec, times) for spec in simulator.series}

    target = next(spec for spec in simulator.series if spec.metric == H2_CPU and spec.labels["host"] == "h2")
    active = (times >= NOW) & (times < NOW + 600)
    assert anomaly.start == NOW
    for spec in simulator.series:
        if spec is target:
            continue
        np.testing.assert_array_equal(during[spec.key], before[spec.key], err_msg=str(spec.key))
    difference = during[target.key] - before[target.key]
    np.testing.assert_allclose(difference[active], 10 * target.noise)
    np.testing.assert_array_equal(difference[~active], 0.0)
    assert scraped[(H2_CPU, (("host", "h2"),))] == pytest.approx(before[target.key][times == NOW][0] + 10 * target.noise)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


def test_anomaly_kinds_and_units():
    spec = SeriesSpec("demo_tenant_cpu_cores", {"namespace": "a"}, 4.0, 0.0, CosineShape(12), 0.5)
    times = NOW + np.arange(0, 600, 60.0)
    clean = Simulator([spec]).values(spec, times)
    cases = [
        (Anomaly({"namespace": "a"}, NOW, 600, "spike", 4.0), clean + 2.0),
        (Anomaly({"namespace": "a"}, NOW, 600, "level_shift", -2.0), clean - 1.0),
        (Anomaly({"namespace": "a"}, NOW, 600, "drop", 0.5, unit="relative"), clean - 2.0),
        (Anomaly({"namespace": "a"}, NOW, None, "drop", 1.0, unit="relative"), np.clip(clean - 4.0, 0, None)),
    ]
    for anomaly, expected in cases:
        values = Simulator([spec], [anomaly]).values(spec, times)
        np.testing.assert_allclose(values, expected, err_msg=f"{anomaly.kind} {anomaly.unit}")


def test_anomaly_invalid_rejected():
    simulator = Simulator(default_series())
    with pytest.raises(ValueError, match="matches no series"):
        simulator.add_anomaly(Anomaly({"host": "h9"}, NOW, 60))
    with pytest.raises(ValueError, match="Use level_shift"):
        Anomaly({"host": "h2"}, NOW, 60, "spike", -3.0)
    with pytest.raises(ValueError, match="invalid anomaly kind"):
        Anomaly({"host": "h2"}, NOW, 60, "wobble")
    with pytest.raises(ValueError, match="duration"):
        Anomaly({"host": "h2"}, NOW, 0)


def test_default_scenario_clean_entities():
    with_anomalies = history_by_key(default_simulator(NOW), NOW - 4 * 86400, NOW, 300)
    clean = history_by_key(Simulator(default_series()), NOW - 4 * 86400, NOW, 300)

    changed = {dict(labels).get("namespace") or dict(labels).get("host") or dict(labels).get("equipment")
               for (metric, labels), (_, values) in with_anomalies.items()
               if not np.array_equal(values, clean[(metric, labels)][1])}
    assert changed == {"search", "reports", "h4", "compressor-1", "pump-2"}
    ongoing = [anomaly for anomaly in default_anomalies(NOW) if anomaly.duration is None]
    assert {anomaly.match["equipment"] for anomaly in ongoing} == {"pump-2"}
    assert default_anomalies(NOW, ongoing=False) == [a for a in default_anomalies(NOW) if a.duration is not None]


def test_daily_and_weekly_cycles():
    business = WindowShape(8, 19)
    nightly = WindowShape(22, 2)
    hours = np.array([3.0, 13.5, 23.5, 0.5])
    np.testing.assert_allclose(business(hours)[:2], [0.0, 1.0], atol=0.01)
    np.testing.assert_allclose(nightly(hours)[2:], [1.0, 1.0], atol=0.15)
    assert nightly(np.array([12.0]))[0] < 0.01

    simulator = Simulator(default_series())
    h1 = next(spec for spec in simulator.series if spec.labels.get("host") == "h1")
    wednesday_noon = pd.Timestamp("2025-06-11 13:00", tz="UTC").timestamp()
    saturday_noon = pd.Timestamp("2025-06-14 13:00", tz="UTC").timestamp()
    weekday, weekend = simulator.expected(h1, np.array([wednesday_noon, saturday_noon]))
    assert h1.weekend_factor == 0.5
    assert weekday == pytest.approx(h1.level + h1.daily_amplitude, rel=0.01)
    assert weekend == pytest.approx(h1.level + h1.daily_amplitude * h1.weekend_factor, rel=0.01)


# --- tenants, nodes and machines for the tenant and equipment detectors --------------------------


def series_of(simulator, metric, **labels):
    return next(spec for spec in simulator.series if spec.metric == metric and all(
        spec.labels.get(name) == value for name, value in labels.items()))


def test_noisy_neighbour_episode_changes():
    clean = Simulator(default_series())
    episode = Simulator(default_series(), noisy_neighbour_episode(NOW, 3600))
    # Samples every 20 minutes over a day, so the episode is checked at every hour of the day.
    times = NOW + np.arange(-3600, 86400, 1200.0)
    during = (times >= NOW) & (times < NOW + 3600)
    changed = set()
    for spec in clean.series:
        before, after = clean.values(spec, times), episode.values(spec, times)
        np.testing.assert_array_equal(after[~during], before[~during])
        if not np.array_equal(after, before):
            changed.add((spec.metric, spec.labels.get("namespace") or spec.labels.get("node")))
    etl_cpu = series_of(clean, TENANT_CPU, namespace=NOISY_TENANT)
    shop_latency = series_of(clean, TENANT_LATENCY, namespace="shop")
    shop_requests = series_of(clean, TENANT_REQUESTS, namespace="shop")
    node_cpu = series_of(clean, NODE_CPU, node=NOISY_NODE)

    assert changed == {
        (TENANT_CPU, NOISY_TENANT), (TENANT_MEMORY, NOISY_TENANT), (NODE_CPU, NOISY_NODE),
        *((metric, tenant) for tenant in AFFECTED_TENANTS for metric in (TENANT_LATENCY, TENANT_REQUESTS)),
    }
    assert set(AFFECTED_TENANTS) | {NOISY_TENANT} <= {name for name, t in TENANTS.items() if t.node == NOISY_NODE}
    assert episode.values(node_cpu, times[during]).min() >= 0.85
    assert clean.values(node_cpu, times).max() < 0.85
    np.testing.assert_allclose(episode.values(etl_cpu, times[during]) - clean.values(etl_cpu, times[during]),
                               3.0 * clean.expected(etl_cpu, times[during]))
    np.testing.assert_allclose(episode.values(shop_latency, times[during]) - clean.values(shop_latency, times[during]),
                               1.5 * clean.expected(shop_latency, times[during]))
    np.testing.assert_allclose(clean.values(shop_requests, times[during]) - episode.values(shop_requests, times[during]),
                               0.5 * clean.expected(shop_requests, times[during]))


def test_imbalance_triples_one_band():
    clean = Simulator(default_series())
    faulty = Simulator(default_series(), [imbalance("pump-2", NOW)])
    times = NOW + np.arange(0, 600, 60.0)
    one_x = f"{order_band('pump-2', 1):g}"
    changed = [spec for spec in clean.series if not np.array_equal(clean.values(spec, times), faulty.values(spec, times))]
    assert [(spec.metric, spec.labels) for spec in changed] == [(EQUIPMENT_BAND, {"equipment": "pump-2", "frequency_hz": one_x})]
    np.testing.assert_allclose(faulty.values(changed[0], times) - clean.values(changed[0], times),
                               2.0 * clean.expected(changed[0], times))


def test_spectrum_peaks_at_shaft_orders():
    simulator = Simulator(default_series())
    assert (order_band("pump-1", 1), order_band("pump-1", 2)) == (25.0, 50.0)
    assert (order_band("compressor-1", 1), order_band("compressor-1", 2)) == (50.0, 100.0)
    for equipment in ("pump-1", "pump-2", "compressor-1"):
        level = {frequency: series_of(simulator, EQUIPMENT_BAND, equipment=equipment, frequency_hz=f"{frequency:g}").level
                 for frequency in BAND_FREQUENCIES_HZ}
        one_x, two_x = level.pop(order_band(equipment, 1)), level.pop(order_band(equipment, 2))
        assert one_x > two_x > max(level.values())


def test_pods_place_each_tenant_once():
    simulator = Simulator(default_series())
    pods = [spec for spec in simulator.series if spec.metric == TENANT_PODS]
    values = np.concatenate([simulator.values(spec, NOW + np.arange(0, 86400, 300.0)) for spec in pods])
    assert sorted((spec.labels["namespace"], spec.labels["node"]) for spec in pods) == sorted(
        (name, tenant.node) for name, tenant in TENANTS.items())
    np.testing.assert_array_equal(values, np.round(values))
    assert values.min() >= 1


def test_resolution_rounds_values():
    spec = SeriesSpec("demo_count", {"entity": "a"}, 3.0, 0.0, CosineShape(12), 0.4, resolution=0.5)
    values = Simulator([spec]).values(spec, NOW + np.arange(0, 3600, 15.0))
    np.testing.assert_array_equal(values * 2, np.round(values * 2))
    with pytest.raises(ValueError, match="invalid resolution"):
        SeriesSpec("demo_count", {"entity": "a"}, 3.0, 0.0, CosineShape(12), 0.4, resolution=0.0)


def test_history_metric_steps():
    simulator = default_simulator(NOW)
    rows = list(simulator.history(NOW - 600, NOW, 60, job="demo", instance="x", metric_steps={TENANT_CPU: 30}))
    grids = {metric: timestamps.size for metric, _, timestamps, _ in rows}
    shop = next(values for metric, labels, _, values in rows if metric == TENANT_CPU and labels["namespace"] == "shop")
    coarse = history_by_key(simulator, NOW - 600, NOW, 60, instance="x")

    assert grids[TENANT_CPU] == 21
    assert grids[TENANT_MEMORY] == 11
    np.testing.assert_array_equal(shop[::2], coarse[(TENANT_CPU, (("instance", "x"), ("job", "demo"), ("namespace", "shop")))][1])
    with pytest.raises(ValueError, match="invalid step"):
        list(simulator.history(NOW - 600, NOW, 60, job="demo", instance="x", metric_steps={TENANT_CPU: 0}))


def test_demo_config_reads_simulated_metrics():
    config = load_config(DEMO_CONFIG)
    detectors = {detector.name: detector for detector in config.detectors}
    simulated = {spec.metric for spec in default_series()}
    tenant_metrics = {name for query in detectors["tenants"].queries.values() for name in re.findall(r"demo_\w+", query)}
    demo_metrics = {name for detector in config.detectors
                    for query in [detector.query or "", *detector.queries.values()] for name in re.findall(r"demo_\w+", query)}

    assert detectors["tenants"].type == "tenant"
    assert detectors["equipment"].type == "equipment"
    assert demo_metrics <= simulated
    assert tenant_metrics == set(TENANT_DETECTOR_METRICS)
    assert detectors["tenants"].step == TENANT_HISTORY_STEP
