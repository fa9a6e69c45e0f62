"""Integration tests of PrometheusSource against a real Prometheus 2.42 on 127.0.0.1.

History is backfilled with promtool before Prometheus starts. Failures that Prometheus
cannot produce on demand (503 responses, a server that comes up late) come from a small
proxy on 127.0.0.1 that forwards to the real Prometheus. Basic auth and TLS are checked
against a second Prometheus that serves HTTPS with a --web.config.file.
"""

import base64
import http.server
import importlib
import logging
import shutil
import subprocess
import threading
import time
import warnings

import numpy as np
import pytest
import requests
import yaml

from exporter.config import SourceConfig
from exporter.demo.stack import (
    PrometheusProcess,
    ProcessStartError,
    Series,
    StackError,
    free_port,
)
from exporter.source import PrometheusSource, QueryError, SourceUnavailable

pytestmark = pytest.mark.stack

# 2023-11-14 00:00:00 UTC, a day boundary, so that offsets in the data read as times of day.
T0 = 1_699_920_000
MINUTE = 60
HOUR = 3600
DAY = 86400

# Prometheus' default --query.lookback-delta is 5m, so an instant selector returns the newest
# sample at most this old. Samples of the gap and churn series sit 30 s off the query grid, so no
# grid point is exactly this far from a sample and the boundary rule does not matter.
LOOKBACK_SECONDS = 300

INF_POSITIONS = (5, 17)
MINUS_INF_POSITIONS = (30,)
GAP_MINUTES = range(60, 90)


# ---------------------------------------------------------------------------
# Backfilled history
# ---------------------------------------------------------------------------


def grid_sample_times() -> np.ndarray:
    """Sample times of src_grid: every minute on the minute for two days."""
    return T0 + MINUTE * np.arange(2 * DAY // MINUTE + 1, dtype=np.float64)


def grid_value_at(times: np.ndarray) -> np.ndarray:
    """The src_grid value an instant query at ``times`` returns: the minute number of the newest sample."""
    return np.floor((times - T0) / MINUTE + 1e-9)


def special_values() -> np.ndarray:
    values = np.arange(60, dtype=np.float64)
    values[list(INF_POSITIONS)] = np.inf
    values[list(MINUS_INF_POSITIONS)] = -np.inf
    return values


def gap_sample_minutes() -> np.ndarray:
    minutes = np.arange(180)
    return minutes[~np.isin(minutes, list(GAP_MINUTES))]


def off_grid_times(minutes: np.ndarray) -> np.ndarray:
    return T0 + 30.0 + MINUTE * minutes


def history() -> list[Series]:
    grid_times = grid_sample_times()
    grid_minutes = np.arange(grid_times.size, dtype=np.float64)
    gap_minutes = gap_sample_minutes()
    old_minutes = np.arange(0, 120)
    new_minutes = np.arange(150, 240)
    return [
        Series("src_grid", {"instance": "a"}, grid_times, grid_minutes),
        Series("src_grid_copy", {"instance": "a"}, grid_times, grid_minutes + 0.5),
        Series("src_special", {"instance": "a"}, grid_times[:60], special_values()),
        Series("src_gappy", {"instance": "a"}, off_grid_times(gap_minutes), gap_minutes.astype(np.float64)),
        Series("src_churn", {"pod": "old"}, off_grid_times(old_minutes), old_minutes.astype(np.float64)),
        Series("src_churn", {"pod": "new"}, off_grid_times(new_minutes), new_minutes.astype(np.float64)),
    ]


def lookback_row(sample_times: np.ndarray, sample_values: np.ndarray, grid_times: np.ndarray) -> np.ndarray:
    """Compute what an instant selector returns at each grid time: the newest sample within the lookback, else NaN."""
    newest = np.searchsorted(sample_times, grid_times, side="right") - 1
    row = np.full(grid_times.size, np.nan)
    for column, index in enumerate(newest):
        if index >= 0 and grid_times[column] - sample_times[index] < LOOKBACK_SECONDS:
            row[column] = sample_values[index]
    return row


# ---------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(start_prometheus) -> PrometheusProcess:
    return start_prometheus(history())


@pytest.fixture
def open_source():
    """Return a function that builds a PrometheusSource from SourceConfig keys, and close them all after the test."""
    sources = []

    def open_source(url: str, **options) -> PrometheusSource:
        source = PrometheusSource(SourceConfig(url=url, **options))
        sources.append(source)
        return source

    yield open_source
    for source in sources:
        source.close()


def prometheus_error(url: str, query: str, start: float, end: float, step: float) -> str:
    """Send a range query straight to Prometheus and return the ``error`` text of its JSON response."""
    with requests.Session() as session:
        session.trust_env = False
        response = session.get(
            f"{url}/api/v1/query_range",
            params={"query": query, "start": start, "end": end, "step": step},
            timeout=30,
        )
    return response.json()["error"]


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: "_ProxyServer"

    def do_GET(self) -> None:  # noqa: N802 (name fixed by BaseHTTPRequestHandler)
        self._forward()

    def do_POST(self) -> None:  # noqa: N802
        self._forward()

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.take_request({name.lower(): value for name, value in self.headers.items()}):
            self._respond(503, b'{"status":"error","errorType":"unavailable","error":"injected by the test proxy"}')
            return
        headers = {"Content-Type": self.headers["Content-Type"]} if self.headers.get("Content-Type") else {}
        with requests.Session() as session:
            session.trust_env = False
            upstream = session.request(
                self.command, self.server.upstream + self.path, data=body, headers=headers, timeout=30
            )
        self._respond(upstream.status_code, upstream.content)

    def _respond(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # noqa: A002 (signature fixed by the base class)
        pass


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, upstream: str, failures: int | None):
        super().__init__(("127.0.0.1", port), _ProxyHandler)
        self.upstream = upstream
        self.failures = failures
        self.received: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def take_request(self, headers: dict[str, str]) -> bool:
        """Record one request's headers and return True when it gets a 503 response."""
        with self._lock:
            self.received.append(headers)
            if self.failures is None:
                return True
            if self.failures > 0:
                self.failures -= 1
                return True
            return False


class PrometheusProxy:
    """HTTP server on 127.0.0.1 that forwards requests to Prometheus and records their headers.

    The first ``failures`` requests get a 503 response instead. With ``failures=None``
    every request gets one.
    """

    def __init__(self, upstream: str, *, failures: int | None = 0, port: int = 0):
        self._server = _ProxyServer(port, upstream, failures)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def received(self) -> list[dict[str, str]]:
        """Lower-cased request headers, one dict per request received."""
        return list(self._server.received)

    def __enter__(self) -> "PrometheusProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


# ---------------------------------------------------------------------------
# Time grid and values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "step", "points"),
    [
        (T0, 60.0, 30),
        (T0 + 59.6, 60.0, 30),
        (T0 + 0.25, 15.0, 40),
        (T0, 1_000_003.0, 3),
    ],
)
def test_grid_matches_evaluation_time(prometheus, open_source, start, step, points):
    source = open_source(prometheus.url)
    end = start + step * (points - 1)

    panel = source.query_range("vector(time())", start, end, step)

    np.testing.assert_allclose(panel.timestamps, start + step * np.arange(points), rtol=0, atol=1e-6)
    # time() returns the evaluation time, so each value shows where Prometheus evaluated.
    np.testing.assert_allclose(panel.values[0], panel.timestamps, rtol=0, atol=1e-3)


@pytest.mark.parametrize("offset", [0.0, 30.0, 59.6])
def test_grid_values_from_samples(prometheus, open_source, offset):
    source = open_source(prometheus.url)
    start = T0 + 10 * MINUTE + offset

    panel = source.query_range("src_grid", start, start + HOUR, MINUTE)

    assert panel.labels == [{"instance": "a"}]
    np.testing.assert_array_equal(panel.values[0], grid_value_at(panel.timestamps))
    assert panel.non_finite_points == 0


def test_chunked_equals_unchunked(prometheus, open_source):
    chunked = open_source(prometheus.url, max_points_per_query=500)
    whole = open_source(prometheus.url, max_points_per_query=10000)
    # 1999 points are three full chunks of 500 and a last chunk of 499.
    end = T0 + 1998 * MINUTE

    small = chunked.query_range("src_grid", T0, end, MINUTE)
    large = whole.query_range("src_grid", T0, end, MINUTE)

    assert small.timestamps.size == 1999
    np.testing.assert_array_equal(small.timestamps, large.timestamps)
    assert small.labels == large.labels
    np.testing.assert_array_equal(small.values, large.values)
    np.testing.assert_array_equal(small.values[0], grid_value_at(small.timestamps))


def test_default_limit_chunks_long_range(prometheus, open_source):
    source = open_source(prometheus.url)
    step = 10.0
    end = T0 + step * 11_199

    panel = source.query_range("src_grid", T0, end, step)

    assert panel.timestamps.size == 11_200
    np.testing.assert_array_equal(panel.values[0], grid_value_at(panel.timestamps))


def test_prometheus_rejects_unchunked_long_range(prometheus):
    # Guards the test above: one request of 11,200 points is over Prometheus' own limit.
    with pytest.raises(StackError, match="maximum resolution"):
        prometheus.query_range("src_grid", T0, T0 + 10.0 * 11_199, 10.0)


def test_duplicates_counted_once_per_series(prometheus, open_source):
    source = open_source(prometheus.url, max_points_per_query=500)

    # Both metrics have the labels {instance="a"} once __name__ is dropped.
    panel = source.query_range('{__name__=~"src_grid|src_grid_copy"}', T0, T0 + 1499 * MINUTE, MINUTE)

    assert panel.duplicate_series == 1
    assert panel.labels == [{"instance": "a"}]
    np.testing.assert_array_equal(panel.values[0], grid_value_at(panel.timestamps))


def test_fractional_timeout_accepted(prometheus, open_source):
    source = open_source(prometheus.url, timeout="1500ms")

    panel = source.query_range("src_grid", T0, T0 + HOUR, MINUTE)

    np.testing.assert_array_equal(panel.values[0], grid_value_at(panel.timestamps))


# ---------------------------------------------------------------------------
# Errors and empty results
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["sum(src_grid", "src_grid @ foo", "rate(src_grid)"])
def test_bad_query_raises_server_message(prometheus, open_source, query):
    source = open_source(prometheus.url)
    expected = prometheus_error(prometheus.url, query, T0, T0 + HOUR, MINUTE)

    with pytest.raises(QueryError) as raised:
        source.query_range(query, T0, T0 + HOUR, MINUTE)

    assert expected in str(raised.value)
    assert "HTTP 400" in str(raised.value)


def test_empty_result_gives_empty_panel(prometheus, open_source):
    source = open_source(prometheus.url)

    panel = source.query_range('src_grid{instance="nowhere"}', T0, T0 + HOUR, MINUTE)

    assert panel.empty
    assert panel.values.shape == (0, 61)
    assert panel.timestamps.size == 61
    assert panel.non_finite_points == 0


# ---------------------------------------------------------------------------
# Non-finite values, gaps and churn
# ---------------------------------------------------------------------------


def test_infinities_become_nan(prometheus, open_source):
    source = open_source(prometheus.url)

    panel = source.query_range("src_special", T0, T0 + 59 * MINUTE, MINUTE)

    expected = special_values()
    expected[~np.isfinite(expected)] = np.nan
    np.testing.assert_array_equal(panel.values[0], expected)
    assert panel.non_finite_points == len(INF_POSITIONS) + len(MINUS_INF_POSITIONS)


def test_promql_nan_becomes_nan(prometheus, open_source):
    source = open_source(prometheus.url)

    # 0 / 0 is NaN in PromQL, so Prometheus returns "NaN" for every point.
    panel = source.query_range("(src_grid - src_grid) / 0", T0, T0 + HOUR, MINUTE)

    assert panel.values.shape == (1, 61)
    assert np.isnan(panel.values).all()
    assert panel.non_finite_points == 61


def test_promql_infinity_counted(prometheus, open_source):
    source = open_source(prometheus.url)

    # src_grid is 0 at T0 and positive after, so this is NaN at T0 and +Inf after.
    panel = source.query_range("src_grid / 0", T0, T0 + 10 * MINUTE, MINUTE)

    assert np.isnan(panel.values).all()
    assert panel.non_finite_points == 11


def test_gap_stays_nan(prometheus, open_source):
    source = open_source(prometheus.url)
    minutes = gap_sample_minutes()

    panel = source.query_range("src_gappy", T0, T0 + 3 * HOUR, MINUTE)

    expected = lookback_row(off_grid_times(minutes), minutes.astype(np.float64), panel.timestamps)
    np.testing.assert_array_equal(panel.values[0], expected)
    inside_gap = (panel.timestamps > off_grid_times(np.array([GAP_MINUTES.start]))[0] + LOOKBACK_SECONDS) & (
        panel.timestamps < off_grid_times(np.array([GAP_MINUTES.stop]))[0]
    )
    assert inside_gap.sum() > 20
    assert np.isnan(panel.values[0][inside_gap]).all()
    assert panel.non_finite_points == 0


def test_churned_series_nan_outside_lifetime(prometheus, open_source):
    source = open_source(prometheus.url)
    old_minutes, new_minutes = np.arange(0, 120), np.arange(150, 240)

    panel = source.query_range("src_churn", T0, T0 + 5 * HOUR, MINUTE)

    rows = {labels["pod"]: row for labels, row in zip(panel.labels, panel.values)}
    assert sorted(rows) == ["new", "old"]
    old_expected = lookback_row(off_grid_times(old_minutes), old_minutes.astype(np.float64), panel.timestamps)
    new_expected = lookback_row(off_grid_times(new_minutes), new_minutes.astype(np.float64), panel.timestamps)
    np.testing.assert_array_equal(rows["old"], old_expected)
    np.testing.assert_array_equal(rows["new"], new_expected)
    assert np.isnan(rows["old"][panel.timestamps > off_grid_times(old_minutes)[-1] + LOOKBACK_SECONDS]).all()
    assert np.isnan(rows["new"][panel.timestamps < off_grid_times(new_minutes)[0]]).all()


# ---------------------------------------------------------------------------
# Retries and the up flag
# ---------------------------------------------------------------------------


def test_refused_connection_then_recovery(prometheus, open_source, caplog):
    port = free_port()
    source = open_source(f"http://127.0.0.1:{port}", max_retries=2)

    with caplog.at_level(logging.WARNING, logger="exporter.source"):
        with pytest.raises(SourceUnavailable) as raised:
            source.query_range("src_grid", T0, T0 + HOUR, MINUTE)

    retries = [record for record in caplog.records if "retry" in record.getMessage()]
    assert len(retries) == 2
    assert "after 3 attempts" in str(raised.value)
    assert "Connection refused" in str(raised.value)
    assert source.up is False

    with PrometheusProxy(prometheus.url, port=port):
        panel = source.query_range("src_grid", T0, T0 + HOUR, MINUTE)

    assert source.up is True
    np.testing.assert_array_equal(panel.values[0], grid_value_at(panel.timestamps))


def test_503_retried_then_succeeds(prometheus, open_source):
    with PrometheusProxy(prometheus.url, failures=2) as proxy:
        source = open_source(proxy.url, max_retries=2)
        panel = source.query_range("src_grid", T0, T0 + HOUR, MINUTE)

    assert len(proxy.received) == 3
    assert source.up is True
    np.testing.assert_array_equal(panel.values[0], grid_value_at(panel.timestamps))


def test_503_exhausts_retries(prometheus, open_source):
    with PrometheusProxy(prometheus.url, failures=None) as proxy:
        source = open_source(proxy.url, max_retries=1)
        with pytest.raises(SourceUnavailable) as raised:
            source.query_range("src_grid", T0, T0 + HOUR, MINUTE)

    assert len(proxy.received) == 2
    assert "HTTP 503: injected by the test proxy" in str(raised.value)
    assert source.up is False


# ---------------------------------------------------------------------------
# Headers and credentials
# ---------------------------------------------------------------------------


def test_headers_and_bearer_token_sent(prometheus, open_source, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n", encoding="utf-8")

    with PrometheusProxy(prometheus.url) as proxy:
        source = open_source(proxy.url, headers={"X-Scope-OrgID": "tenant-a"}, bearer_token_file=token_file)
        source.query_range("src_grid", T0, T0 + HOUR, MINUTE)

    assert len(proxy.received) == 1
    assert proxy.received[0].get("x-scope-orgid") == "tenant-a"
    assert proxy.received[0].get("authorization") == "Bearer s3cret-token"


def test_basic_auth_header_sent(prometheus, open_source, tmp_path):
    password_file = tmp_path / "password"
    password_file.write_text("pa ss:word\n", encoding="utf-8")

    with PrometheusProxy(prometheus.url) as proxy:
        source = open_source(proxy.url, basic_auth={"username": "alice", "password_file": password_file})
        source.query_range("src_grid", T0, T0 + HOUR, MINUTE)

    scheme, _, encoded = proxy.received[0].get("authorization", "").partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode("utf-8") == "alice:pa ss:word"


def bcrypt_hash(password: str) -> str:
    """Hash ``password`` for Prometheus' basic_auth_users with the bcrypt package or libcrypt."""
    try:
        bcrypt = importlib.import_module("bcrypt")
    except ImportError:
        bcrypt = None
    if bcrypt is not None:
        return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds=4)).decode("ascii")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            crypt = importlib.import_module("crypt")  # removed in Python 3.13
    except ImportError:
        pytest.fail("no bcrypt implementation: install it with: pip install bcrypt")
    if crypt.METHOD_BLOWFISH not in crypt.methods:
        pytest.fail("libcrypt has no bcrypt support: install it with: pip install bcrypt")
    return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))


class SecuredPrometheus(PrometheusProcess):
    """Prometheus serving HTTPS with basic auth, as set in a --web.config.file.

    PrometheusProcess polls /-/ready over plain HTTP without credentials, which this
    server rejects, so this class polls it over HTTPS with the CA file and the password.
    """

    def __init__(self, web_config, ca_file, auth: tuple[str, str]):
        super().__init__(extra_args=[f"--web.config.file={web_config}"], start_timeout=30.0)
        self.ca_file = ca_file
        self.auth = auth

    @property
    def url(self) -> str:
        return super().url.replace("http://", "https://", 1)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        with requests.Session() as session:
            session.trust_env = False
            while self.running and time.monotonic() < deadline:
                try:
                    response = session.get(f"{self.url}/-/ready", verify=str(self.ca_file), auth=self.auth, timeout=1)
                    if response.status_code == 200:
                        return
                except requests.RequestException:
                    pass
                time.sleep(0.05)
        raise ProcessStartError(f"prometheus with TLS and basic auth was not ready at {self.url}:\n{self.log_tail()}")


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """Start Prometheus on HTTPS with a self-signed certificate and the user alice.

    Yields the process and the folder that contains cert.pem and the password files.
    """
    directory = tmp_path_factory.mktemp("secured")
    cert, key = directory / "cert.pem", directory / "key.pem"
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl not found on PATH: install it with: apt-get install -y openssl")
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1", "-addext", "basicConstraints=critical,CA:TRUE",
        ],
        check=True,
        capture_output=True,
    )
    password = "correct horse"
    web_config = directory / "web.yml"
    web_config.write_text(
        yaml.safe_dump(
            {
                "tls_server_config": {"cert_file": str(cert), "key_file": str(key)},
                "basic_auth_users": {"alice": bcrypt_hash(password)},
            }
        ),
        encoding="utf-8",
    )
    (directory / "password").write_text(password + "\n", encoding="utf-8")
    (directory / "wrong-password").write_text("wrong horse\n", encoding="utf-8")
    with SecuredPrometheus(web_config, cert, ("alice", password)) as process:
        yield process, directory


def test_basic_auth_over_tls(secured, open_source):
    process, directory = secured
    source = open_source(
        process.url,
        basic_auth={"username": "alice", "password_file": directory / "password"},
        tls={"ca_file": directory / "cert.pem"},
    )

    panel = source.query_range("vector(time())", T0, T0 + HOUR, MINUTE)

    np.testing.assert_allclose(panel.values[0], panel.timestamps, rtol=0, atol=1e-3)
    assert source.up is True


def test_wrong_password_rejected(secured, open_source):
    process, directory = secured
    source = open_source(
        process.url,
        basic_auth={"username": "alice", "password_file": directory / "wrong-password"},
        tls={"ca_file": directory / "cert.pem"},
        max_retries=0,
    )

    with pytest.raises(QueryError, match="HTTP 401"):
        source.query_range("vector(1)", T0, T0 + HOUR, MINUTE)
    assert source.up is False


def test_unknown_ca_rejected(secured, open_source):
    process, directory = secured
    source = open_source(
        process.url,
        basic_auth={"username": "alice", "password_file": directory / "password"},
        max_retries=0,
    )

    with pytest.raises(SourceUnavailable) as raised:
        source.query_range("vector(1)", T0, T0 + HOUR, MINUTE)

    assert "certificate verify failed" in str(raised.value).lower(), str(raised.value)
    assert source.up is False

