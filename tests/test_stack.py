"""Tests for exporter.demo.stack.

The tests marked ``stack`` run the real promtool, prometheus and
prometheus-alertmanager binaries on 127.0.0.1. A missing binary fails them
with the apt-get command that installs it.
"""

from __future__ import annotations

import socket
import stat
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from exporter.demo import stack
from exporter.demo.stack import (
    INSTALL_HINT,
    AlertmanagerProcess,
    BackfillError,
    BinaryNotFoundError,
    ProcessStartError,
    PrometheusProcess,
    Series,
    StackError,
    WebhookReceiver,
    backfill,
    backfill_series,
    find_binary,
    free_port,
    openmetrics_lines,
    write_openmetrics,
)

MINUTE = 60
DAY = 86400


def local_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def write_rule_file(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# find_binary and free_port
# ---------------------------------------------------------------------------


def test_find_binary_returns_first_found():
    found = find_binary("anomaly-exporter-no-such-binary", "promtool")

    assert Path(found).name == "promtool"


def test_find_binary_missing_names_install_hint():
    with pytest.raises(BinaryNotFoundError) as raised:
        find_binary("anomaly-exporter-no-such-binary", "another-missing-binary")

    message = str(raised.value)
    assert "anomaly-exporter-no-such-binary" in message
    assert "another-missing-binary" in message
    assert INSTALL_HINT in message


def test_free_port_is_bindable_on_localhost():
    port = free_port()

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


# ---------------------------------------------------------------------------
# OpenMetrics text
# ---------------------------------------------------------------------------


def test_openmetrics_groups_samples_by_family():
    series = [
        Series("demo_a", {"instance": "1"}, np.array([10, 20]), np.array([1.0, 2.0])),
        Series("demo_b", {}, np.array([10]), np.array([3.5])),
        Series("demo_a", {"instance": "2"}, np.array([10]), np.array([4.0])),
    ]

    lines = list(openmetrics_lines(series))

    assert lines == [
        "# TYPE demo_a gauge",
        'demo_a{instance="1"} 1.0 10',
        'demo_a{instance="1"} 2.0 20',
        'demo_a{instance="2"} 4.0 10',
        "# TYPE demo_b gauge",
        "demo_b 3.5 10",
        "# EOF",
    ]


def test_openmetrics_escapes_label_values():
    labels = {"path": 'C:\\temp "quoted"\nsecond line', "a_first": "x"}
    series = [Series("demo", labels, np.array([1]), np.array([0.0]))]

    lines = list(openmetrics_lines(series))

    assert lines[1] == 'demo{a_first="x",path="C:\\\\temp \\"quoted\\"\\nsecond line"} 0.0 1'


def test_openmetrics_skips_nan_and_empty_families():
    series = [
        Series("demo_partial", {}, np.array([1, 2, 3]), np.array([1.0, np.nan, 3.0])),
        Series("demo_all_nan", {}, np.array([1, 2]), np.array([np.nan, np.nan])),
    ]

    lines = list(openmetrics_lines(series))

    assert lines == ["# TYPE demo_partial gauge", "demo_partial 1.0 1", "demo_partial 3.0 3", "# EOF"]


def test_openmetrics_formats_special_floats():
    values = np.array([np.inf, -np.inf, 0.1, 1e-300, 123456789.123456789])
    series = [Series("demo", {}, np.arange(1, 6), values)]

    samples = list(openmetrics_lines(series))[1:-1]
    texts = [line.split(" ")[1] for line in samples]

    assert texts[:2] == ["+Inf", "-Inf"]
    assert [float(text) for text in texts[2:]] == values[2:].tolist()


def test_openmetrics_fractional_timestamps_survive_truncation():
    # promtool converts with int64(seconds * 1000), which truncates toward zero.
    rng = np.random.default_rng(7)
    milliseconds = np.sort(rng.choice(4_000_000_000_000, size=20_000, replace=False))
    series = [Series("demo", {}, milliseconds / 1000.0, np.zeros(len(milliseconds)))]

    samples = list(openmetrics_lines(series))[1:-1]
    parsed = [int(float(line.split(" ")[2]) * 1000) for line in samples]

    assert parsed == milliseconds.tolist()


@pytest.mark.parametrize(
    ("series", "error", "fragment"),
    [
        (("0bad", {}, [1], [1.0]), ValueError, "invalid metric name"),
        (("demo", {"bad-name": "x"}, [1], [1.0]), ValueError, "invalid label name"),
        (("demo", {"__name__": "x"}, [1], [1.0]), ValueError, "__name__"),
        (("demo", {"instance": 1}, [1], [1.0]), TypeError, "must be str"),
        (("demo", {}, [1, 2], [1.0]), ValueError, "equal length"),
        (("demo", {}, [[1]], [[1.0]]), ValueError, "1-D"),
        (("demo", {}, [-1], [1.0]), ValueError, ">= 0"),
        (("demo", {}, [np.inf], [1.0]), ValueError, "finite"),
        (("demo", {}, [2, 1], [1.0, 2.0]), ValueError, "strictly increasing"),
        (("demo", {}, [1.0, 1.0001], [1.0, 2.0]), ValueError, "strictly increasing"),
    ],
)
def test_openmetrics_rejects_invalid_series(series, error, fragment):
    with pytest.raises(error, match=fragment):
        list(openmetrics_lines([series]))


def test_openmetrics_rejects_duplicate_series():
    series = [
        ("demo", {"instance": "1"}, [1], [1.0]),
        ("demo", {"instance": "1"}, [2], [2.0]),
    ]

    with pytest.raises(ValueError, match="duplicate series"):
        list(openmetrics_lines(series))


def test_write_openmetrics_matches_lines(tmp_path):
    series = [
        Series("demo_a", {"x": "1"}, np.array([1, 2]), np.array([1.0, np.nan])),
        Series("demo_b", {}, np.array([1.5]), np.array([2.0])),
    ]
    path = tmp_path / "series.om"

    sample_count = write_openmetrics(series, path)

    assert sample_count == 2
    assert path.read_text(encoding="utf-8") == "\n".join(openmetrics_lines(series)) + "\n"


def test_write_openmetrics_fifty_series_fast(tmp_path):
    timestamps = np.arange(0, 3 * DAY, MINUTE) + 1_700_000_000
    series = [
        Series("demo_load", {"instance": f"host-{index}"}, timestamps, np.sin(timestamps / 3600.0) + index)
        for index in range(50)
    ]

    started = time.perf_counter()
    sample_count = write_openmetrics(series, tmp_path / "series.om")
    elapsed = time.perf_counter() - started

    assert sample_count == 50 * len(timestamps)
    # Measured at 0.2 s on a 2-core machine. The bound only catches a
    # regression to much slower per-sample formatting.
    assert elapsed < 10.0


# ---------------------------------------------------------------------------
# Config generation (no process is started)
# ---------------------------------------------------------------------------


def test_prometheus_config_translates_scrape_configs(tmp_path):
    rule_file = write_rule_file(tmp_path / "rules.yml", "groups: []\n")
    prometheus = PrometheusProcess(
        scrape_configs=[
            {"job_name": "exporter", "targets": ["127.0.0.1:9100"], "scrape_interval": 0.5, "honor_labels": True},
            {"job_name": "labelled", "targets": ["127.0.0.1:9101"], "labels": {"env": "test"}},
        ],
        rule_files=[rule_file],
        alertmanager_url="http://127.0.0.1:9093/prefix",
        evaluation_interval=2,
    )
    try:
        config = prometheus.config()
    finally:
        prometheus.close()

    assert config["global"]["evaluation_interval"] == "2s"
    assert config["scrape_configs"][0] == {
        "job_name": "exporter",
        "scrape_interval": "500ms",
        "honor_labels": True,
        "static_configs": [{"targets": ["127.0.0.1:9100"]}],
    }
    assert config["scrape_configs"][1]["static_configs"] == [{"targets": ["127.0.0.1:9101"], "labels": {"env": "test"}}]
    assert config["rule_files"] == [str(rule_file.resolve())]
    assert config["alerting"]["alertmanagers"] == [
        {
            "scheme": "http",
            "path_prefix": "/prefix",
            "api_version": "v2",
            "static_configs": [{"targets": ["127.0.0.1:9093"]}],
        }
    ]


@pytest.mark.parametrize(
    ("arguments", "error", "fragment"),
    [
        ({"scrape_configs": [{"targets": ["127.0.0.1:1"]}]}, ValueError, "job_name"),
        ({"scrape_configs": [{"job_name": "x", "targets": "127.0.0.1:1"}]}, ValueError, "targets"),
        ({"scrape_configs": [{"job_name": "x", "targets": []}]}, ValueError, "targets"),
        ({"scrape_configs": [{"job_name": "x", "targets": ["127.0.0.1:1"], "scrape_interval": "soon"}]}, ValueError, "invalid duration"),
        ({"rule_files": ["/nonexistent/rules.yml"]}, FileNotFoundError, "rule file not found"),
        ({"alertmanager_url": "127.0.0.1:9093"}, ValueError, "invalid Alertmanager URL"),
        ({"retention": -1}, ValueError, "non-negative"),
    ],
)
def test_prometheus_rejects_invalid_arguments(arguments, error, fragment):
    with pytest.raises(error, match=fragment):
        PrometheusProcess(**arguments)


def test_alertmanager_config_webhook_and_inhibit():
    inhibit_rule = {"source_matchers": ['severity="page"'], "target_matchers": ['severity="ticket"'], "equal": ["instance"]}
    alertmanager = AlertmanagerProcess(
        "http://127.0.0.1:8080/webhook",
        group_wait=0.2,
        group_interval="1s",
        repeat_interval="1m",
        inhibit_rules=[inhibit_rule],
    )
    try:
        config = alertmanager.config()
    finally:
        alertmanager.close()

    assert config["route"]["group_wait"] == "200ms"
    assert config["route"]["repeat_interval"] == "1m"
    assert config["receivers"][0]["webhook_configs"] == [{"url": "http://127.0.0.1:8080/webhook", "send_resolved": True}]
    assert config["inhibit_rules"] == [inhibit_rule]


# ---------------------------------------------------------------------------
# Backfill and Prometheus
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def history() -> list[Series]:
    """Two series over the last 3 days at 1-minute resolution, ending about 2 minutes ago."""
    end = int(time.time()) // MINUTE * MINUTE - 2 * MINUTE
    timestamps = np.arange(end - 3 * DAY, end + 1, MINUTE)
    daily = np.sin(2 * np.pi * timestamps / DAY)
    return [
        Series(
            "demo_cpu_usage_ratio",
            {"instance": "web-1", "note": 'quote " backslash \\ newline \n end'},
            timestamps,
            0.5 + 0.3 * daily,
        ),
        Series("demo_requests_per_second", {"instance": "web-2"}, timestamps, np.round(100 + 40 * daily, 3)),
    ]


@pytest.fixture(scope="module")
def fractional_series() -> Series:
    """A series with millisecond timestamps, backfilled in a second promtool run into the same TSDB."""
    end = time.time() - 5 * MINUTE
    timestamps = np.round(end - np.arange(10, 0, -1) * 7.321, 3)
    return Series("demo_fractional", {}, timestamps, np.arange(10.0))


@pytest.fixture(scope="module")
def backfilled_prometheus(history, fractional_series, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tsdb")
    backfill_series(history, data_dir)
    backfill_series([fractional_series], data_dir)
    with PrometheusProcess(data_dir) as prometheus:
        yield prometheus


def assert_range_matches(prometheus: PrometheusProcess, series: Series) -> None:
    timestamps = series.timestamps
    result = prometheus.query_range(series.name, start=timestamps[0], end=timestamps[-1], step=MINUTE)

    assert len(result) == 1
    assert result[0]["metric"] == {"__name__": series.name, **series.labels}
    returned = np.array(result[0]["values"], dtype=object)
    assert returned[:, 0].astype(np.int64).tolist() == timestamps.tolist()
    assert returned[:, 1].astype(np.float64).tolist() == series.values.tolist()


@pytest.mark.stack
def test_backfilled_history_queryable(backfilled_prometheus, history):
    for series in history:
        assert_range_matches(backfilled_prometheus, series)


@pytest.mark.stack
def test_backfill_keeps_millisecond_timestamps(backfilled_prometheus, fractional_series):
    end = fractional_series.timestamps[-1]

    result = backfilled_prometheus.query("demo_fractional[5m]", at=end)

    assert len(result) == 1
    returned = np.array(result[0]["values"], dtype=object)
    returned_milliseconds = np.round(returned[:, 0].astype(np.float64) * 1000).astype(np.int64)
    expected_milliseconds = np.round(fractional_series.timestamps * 1000).astype(np.int64)
    assert returned_milliseconds.tolist() == expected_milliseconds.tolist()
    assert returned[:, 1].astype(np.float64).tolist() == fractional_series.values.tolist()


@pytest.mark.stack
def test_prometheus_restart_keeps_port_and_data(backfilled_prometheus, history):
    prometheus = backfilled_prometheus
    port = prometheus.port
    url = prometheus.url

    with prometheus.stopped():
        assert not prometheus.running
        with pytest.raises(requests.ConnectionError):
            local_session().get(f"{url}/-/ready", timeout=2)

    assert prometheus.running
    assert prometheus.port == port
    assert local_session().get(f"{url}/-/ready", timeout=2).status_code == 200
    for series in history:
        assert_range_matches(prometheus, series)


@pytest.mark.stack
def test_backfill_failure_includes_promtool_output(tmp_path):
    path = tmp_path / "broken.om"
    path.write_text("this is not openmetrics\n", encoding="utf-8")

    with pytest.raises(BackfillError) as raised:
        backfill(path, tmp_path / "tsdb")

    message = str(raised.value)
    assert "exit code 1" in message
    assert "invalid syntax" in message


@pytest.mark.stack
def test_prometheus_start_failure_cleans_up():
    prometheus = PrometheusProcess(extra_args=["--no-such-flag"])
    work_dir = prometheus.work_dir

    with pytest.raises(ProcessStartError) as raised:
        with prometheus:
            pass

    assert "no-such-flag" in str(raised.value)
    assert not prometheus.running
    assert not work_dir.exists()


@pytest.mark.stack
def test_prometheus_close_cleans_up():
    with PrometheusProcess() as prometheus:
        process = prometheus._resources.process
        work_dir = prometheus.work_dir
        assert prometheus.data_dir.is_relative_to(work_dir)
        assert local_session().get(f"{prometheus.url}/-/ready", timeout=2).status_code == 200

    assert process.returncode is not None
    assert not work_dir.exists()
    with pytest.raises(StackError, match="closed"):
        prometheus.start()


@pytest.mark.stack
def test_prometheus_restart_fails_when_port_taken():
    with PrometheusProcess(start_timeout=20) as prometheus:
        prometheus.stop()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
            # SO_REUSEADDR lets the bind succeed while the old server connections sit in TIME_WAIT.
            blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            blocker.bind(("127.0.0.1", prometheus.port))
            blocker.listen()
            with pytest.raises(ProcessStartError, match="address already in use"):
                prometheus.start()

        assert not prometheus.running


@pytest.mark.stack
def test_prometheus_first_start_retries_taken_port(monkeypatch):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken_port = blocker.getsockname()[1]
        ports = iter([taken_port])
        real_free_port = stack.free_port
        monkeypatch.setattr(stack, "free_port", lambda: next(ports, None) or real_free_port())

        with PrometheusProcess() as prometheus:
            assert prometheus.port != taken_port
            assert prometheus.running


@pytest.mark.stack
def test_prometheus_reload_loads_new_rule_file(tmp_path):
    good_rules = write_rule_file(
        tmp_path / "good.yml",
        """\
        groups:
          - name: reload-test
            rules:
              - record: demo:one
                expr: vector(1)
        """,
    )
    broken_rules = write_rule_file(tmp_path / "broken.yml", "groups: [{name: x, rules: [{record: y, expr: 'sum('}]}]\n")

    with PrometheusProcess() as prometheus:
        prometheus.reload(rule_files=[good_rules])
        groups = local_session().get(f"{prometheus.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        assert [group["name"] for group in groups] == ["reload-test"]

        with pytest.raises(StackError, match="rejected the reload"):
            prometheus.reload(rule_files=[broken_rules])


@pytest.mark.stack
def test_stop_kills_process_ignoring_sigterm(tmp_path):
    # A stand-in server that returns 200 on /-/ready but ignores SIGTERM.
    script = tmp_path / "stubborn-server"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!{sys.executable}
            import http.server, signal, sys
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            address = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--web.listen-address=")][0]
            host, port = address.rsplit(":", 1)

            class Ready(http.server.BaseHTTPRequestHandler):
                def do_GET(self):
                    self.send_response(200)
                    self.end_headers()

            http.server.HTTPServer((host, int(port)), Ready).serve_forever()
            """
        ),
        encoding="utf-8",
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)

    with PrometheusProcess(binary=str(script), stop_timeout=0.5) as server:
        process = server._resources.process
        started = time.monotonic()
        server.stop()
        elapsed = time.monotonic() - started

    assert process.returncode == -9
    assert elapsed < 5.0


# ---------------------------------------------------------------------------
# Alertmanager and the webhook receiver
# ---------------------------------------------------------------------------


@pytest.fixture
def webhook():
    with WebhookReceiver() as receiver:
        yield receiver


def has_alertname(name: str):
    return lambda alert: alert["labels"].get("alertname") == name


@pytest.mark.stack
def test_alertmanager_delivers_posted_alert(webhook):
    starts_at = "2026-01-02T03:04:05Z"
    alert = {
        "labels": {"alertname": "DemoAnomaly", "instance": "web-1", "severity": "ticket"},
        "annotations": {"summary": "anomaly score above threshold"},
        "startsAt": starts_at,
    }

    with AlertmanagerProcess(webhook.url, group_wait="100ms", group_interval="500ms") as alertmanager:
        alertmanager.post_alerts([alert])
        firing = webhook.wait_for(has_alertname("DemoAnomaly"), timeout=15)

        assert firing[0]["status"] == "firing"
        assert firing[0]["labels"] == alert["labels"]
        assert firing[0]["annotations"] == alert["annotations"]
        assert firing[0]["startsAt"].startswith("2026-01-02T03:04:05")

        alertmanager.post_alerts([{**alert, "endsAt": "2026-01-02T03:05:05Z"}])
        resolved = webhook.wait_for(lambda item: has_alertname("DemoAnomaly")(item) and item["status"] == "resolved", timeout=15)

        assert resolved[0]["endsAt"].startswith("2026-01-02T03:05:05")


@pytest.mark.stack
def test_alertmanager_inhibit_rule_suppresses_target(webhook):
    inhibit_rule = {"source_matchers": ['alertname="Source"'], "target_matchers": ['alertname="Target"'], "equal": ["instance"]}

    with AlertmanagerProcess(webhook.url, group_wait="100ms", inhibit_rules=[inhibit_rule]) as alertmanager:
        alertmanager.post_alerts(
            [
                {"labels": {"alertname": "Source", "instance": "web-1"}},
                {"labels": {"alertname": "Target", "instance": "web-1"}},
            ]
        )
        webhook.wait_for(has_alertname("Source"), timeout=15)
        states = {alert["labels"]["alertname"]: alert["status"] for alert in alertmanager.get_alerts()}
        # Give a wrongly delivered Target time to arrive: group_wait is 100 ms.
        time.sleep(1.0)

    assert states["Target"]["state"] == "suppressed"
    assert states["Target"]["inhibitedBy"]
    assert not [alert for alert in webhook.alerts() if alert["labels"]["alertname"] == "Target"]


@pytest.mark.stack
def test_prometheus_rule_alert_reaches_webhook(webhook, tmp_path):
    rule_file = write_rule_file(
        tmp_path / "alerts.yml",
        """\
        groups:
          - name: stack-test
            rules:
              - alert: SelfScrapeUp
                expr: up{job="self"} == 1
                labels:
                  severity: info
                annotations:
                  summary: Prometheus scrapes itself
        """,
    )
    port = free_port()

    with AlertmanagerProcess(webhook.url, group_wait="100ms") as alertmanager:
        with PrometheusProcess(
            port=port,
            scrape_configs=[
                {"job_name": "self", "targets": [f"127.0.0.1:{port}"], "scrape_interval": 1, "honor_labels": True}
            ],
            rule_files=[rule_file],
            alertmanager_url=alertmanager.url,
            evaluation_interval=1,
        ):
            alerts = webhook.wait_for(has_alertname("SelfScrapeUp"), timeout=30)

    assert alerts[0]["status"] == "firing"
    assert alerts[0]["labels"]["job"] == "self"
    assert alerts[0]["labels"]["severity"] == "info"
    assert alerts[0]["annotations"] == {"summary": "Prometheus scrapes itself"}


def test_webhook_wait_for_timeout_lists_received(webhook):
    payload = {"receiver": "webhook", "status": "firing", "alerts": [{"status": "firing", "labels": {"alertname": "Other"}}]}
    assert local_session().post(webhook.url, json=payload, timeout=5).status_code == 200

    with pytest.raises(TimeoutError) as raised:
        webhook.wait_for(has_alertname("Missing"), timeout=0.3)

    assert "timed out" in str(raised.value)
    assert "received 1 alerts" in str(raised.value)
    assert "Other" in str(raised.value)


def test_webhook_rejects_invalid_json(webhook):
    response = local_session().post(webhook.url, data=b"not json", timeout=5)

    assert response.status_code == 400
    assert webhook.payloads() == []


def test_webhook_stop_releases_port():
    receiver = WebhookReceiver().start()
    port = int(receiver.url.split(":")[2].split("/")[0])
    receiver.stop()

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
