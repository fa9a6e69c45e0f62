"""The command line, run as a subprocess: check-config, --version and the run service.

The run tests start the exporter on 127.0.0.1 with port 0 and read the bound port from its
log. Its source is a local port that is bound but not listening, so every query is refused,
or a small HTTP server in this process that returns HTTP 503 and records the credentials it
receives.
"""

import base64
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import BLOCKED_RUN
from exporter import __version__

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "tok-7f3a9c1e-bearer-secret"
PASSWORD = "pw-2b8d4e6f-basic-secret"
START_TIMEOUT = 60.0
POLL_TIMEOUT = 30.0


def run_cli(*args, cwd=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def detector(name: str) -> dict:
    return {
        "name": name,
        "query": f"{name}_usage",
        "type": "seasonal",
        "fit_window": "1h",
        "fit_every": "10m",
        "score_every": "1s",
        "step": "1m",
    }


def config(source_url: str, *names: str, **source) -> dict:
    return {
        "source": {"url": source_url, "max_retries": 0, "timeout": "2s", **source},
        "listen_address": "127.0.0.1:0",
        "detectors": [detector(name) for name in names],
    }


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def refused_url():
    """A 127.0.0.1 URL whose port is bound but not listening, so connections are refused."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{holder.getsockname()[1]}"
    holder.close()


# check-config and --version -----------------------------------------------------------------


def test_version_output():
    result = run_cli("--version")

    assert result.returncode == 0
    assert result.stdout.strip() == f"anomaly-exporter {__version__}"


def test_console_script_version():
    script = Path(sys.executable).parent / "anomaly-exporter"

    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0
    assert __version__ in result.stdout


def test_check_config_valid(tmp_path, refused_url):
    path = write(tmp_path / "c.yml", config(refused_url, "cpu", "mem"))

    result = run_cli("check-config", str(path))

    assert result.returncode == 0
    assert "valid" in result.stdout
    assert "cpu" in result.stdout
    assert "mem" in result.stdout


def bad_duration(tmp_path):
    data = config("http://127.0.0.1:9", "cpu")
    data["detectors"][0]["fit_window"] = "5 minutes"
    return write(tmp_path / "c.yml", data)


def unknown_key(tmp_path):
    data = config("http://127.0.0.1:9", "cpu")
    data["detectors"][0]["fitwindow"] = "1h"
    return write(tmp_path / "c.yml", data)


def duplicate_name(tmp_path):
    return write(tmp_path / "c.yml", config("http://127.0.0.1:9", "cpu", "cpu"))


def missing_token(tmp_path):
    return write(tmp_path / "c.yml", config("http://127.0.0.1:9", "cpu", bearer_token_file="absent"))


def text_file(text: str):
    def make(tmp_path):
        path = tmp_path / "c.yml"
        path.write_text(text)
        return path

    return make


def latin1_file(tmp_path):
    path = tmp_path / "c.yml"
    path.write_bytes(b"source:\n  url: http://caf\xe9:9090\n")
    return path


INVALID_FILES = [
    pytest.param(bad_duration, "detectors[0].fit_window (detector 'cpu')", id="bad duration"),
    pytest.param(unknown_key, "detectors[0].fitwindow (detector 'cpu')", id="unknown key"),
    pytest.param(duplicate_name, "detectors[1].name (detector 'cpu')", id="duplicate name"),
    pytest.param(missing_token, "source.bearer_token_file", id="missing token file"),
    pytest.param(text_file("source: [unclosed\n"), "line 2", id="invalid yaml"),
    pytest.param(text_file(""), "empty", id="empty file"),
    pytest.param(text_file("- a\n"), "(top level)", id="list"),
    pytest.param(latin1_file, "not UTF-8", id="not utf8"),
    pytest.param(lambda tmp_path: tmp_path / "absent.yml", "cannot read the file", id="missing file"),
    pytest.param(lambda tmp_path: tmp_path, "cannot read the file", id="directory"),
]


@pytest.mark.parametrize("make_file, expected", INVALID_FILES)
def test_check_config_invalid(tmp_path, make_file, expected):
    result = run_cli("check-config", str(make_file(tmp_path)))

    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def bad_promql(tmp_path):
    data = config("http://127.0.0.1:9", "cpu")
    data["detectors"][0]["query"] = "sum(rate(cpu_usage[5m])"
    return write(tmp_path / "c.yml", data)


def bad_promql_in_queries(tmp_path):
    data = config("http://127.0.0.1:9")
    data["detectors"] = [{
        "name": "tenants", "type": "tenant", "entity_labels": ["namespace"],
        "queries": {"cpu": "sum by (namespace) (cpu)", "memory": "sum by namespace (memory)"},
    }]
    return write(tmp_path / "c.yml", data)


def parser_panic(tmp_path):
    # promql-parser 0.12 panics in Rust on an infinite offset, which reaches Python as a BaseException.
    data = config("http://127.0.0.1:9", "cpu")
    data["detectors"][0]["query"] = "cpu_usage offset Inf"
    return write(tmp_path / "c.yml", data)


@pytest.mark.parametrize("make_file, key", [
    (bad_promql, "detectors[0].query (detector 'cpu')"),
    (parser_panic, "detectors[0].query (detector 'cpu')"),
    (bad_promql_in_queries, "detectors[0].queries.memory (detector 'tenants')"),
])
def test_check_config_rejects_bad_promql(tmp_path, make_file, key):
    path = make_file(tmp_path)

    result = run_cli("check-config", str(path))

    assert result.returncode == 2
    assert key in result.stderr
    assert "not valid PromQL" in result.stderr
    assert "--skip-promql" in result.stderr
    assert "Traceback" not in result.stderr
    # A source with an extended dialect can still check the rest of its file.
    skipped = run_cli("check-config", "--skip-promql", str(path))
    assert skipped.returncode == 0, skipped.stderr


EXPORTER_CONFIGS = sorted(path for path in (ROOT / "examples").rglob("*.y*ml") if "\ndetectors:" in path.read_text())


def test_check_config_csv_source_regex(tmp_path):
    data = {"source": {"csv": {"path": "*.csv"}}, "detectors": [detector("cpu")]}
    data["detectors"][0]["query"] = "machine_.*|ec2-cpu"
    path = write(tmp_path / "c.yml", data)

    result = run_cli("check-config", str(path))

    assert result.returncode == 0, result.stderr


def test_exporter_configs_found():
    assert {path.name for path in EXPORTER_CONFIGS} >= {"exporter.yml", "equipment.yaml", "kubernetes-tenants.yaml"}


@pytest.mark.parametrize("path", EXPORTER_CONFIGS, ids=lambda path: path.name)
def test_shipped_configs_pass_check_config(path):
    result = run_cli("check-config", str(path))

    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("method, expected_code", [("autoencoder", 2), ("both", 2), ("limits", 0)])
def test_check_config_needs_tensorflow_for_autoencoder(tmp_path, method, expected_code):
    data = config("http://127.0.0.1:9")
    data["detectors"] = [{
        "name": "pumps", "type": "equipment", "entity_labels": ["equipment"],
        "queries": {"temperature": "max by (equipment) (temperature_celsius)"},
        "params": {"method": method},
    }]
    path = write(tmp_path / "c.yml", data)

    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, "check-config", str(path)], capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == expected_code, result.stderr
    if expected_code:
        assert "detectors[0].params.method (detector 'pumps')" in result.stderr
        assert "pip install 'anomaly-exporter[tensorflow]'" in result.stderr
        assert "Traceback" not in result.stderr


def test_run_invalid_config(tmp_path):
    result = run_cli("run", "--config", str(bad_duration(tmp_path)))

    assert result.returncode == 2
    assert "detectors[0].fit_window (detector 'cpu')" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_invalid_listen_flag(tmp_path, refused_url):
    path = write(tmp_path / "c.yml", config(refused_url, "cpu"))

    result = run_cli("run", "--config", str(path), "--listen-address", "localhost")

    assert result.returncode == 2
    assert "--listen-address" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_port_in_use(tmp_path, refused_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path = write(tmp_path / "c.yml", config(refused_url, "cpu"))

        result = run_cli("run", "--config", str(path), "--listen-address", f"127.0.0.1:{taken.getsockname()[1]}")

    assert result.returncode == 1
    assert "cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_state_dir_unusable(tmp_path, refused_url):
    (tmp_path / "plain-file").write_text("")
    data = config(refused_url, "cpu")
    data["state_dir"] = "plain-file/state"
    path = write(tmp_path / "c.yml", data)

    result = run_cli("run", "--config", str(path))

    assert result.returncode == 1
    assert "state_dir" in result.stderr
    assert "Traceback" not in result.stderr


# The running service -------------------------------------------------------------------------


class RunningExporter:
    """An ``anomaly-exporter run`` subprocess with its stderr in a file."""

    def __init__(self, config_path: Path, log_path: Path):
        self.config_path = config_path
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "exporter", "run", "--config", str(config_path), "--log-level", "debug"],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        self.port = self._wait_for_port()

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log())
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                raise AssertionError(f"exporter exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"exporter did not log its address within {START_TIMEOUT:g}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def request(self, path: str, method: str = "GET") -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def sample(self, name: str, **labels) -> float | None:
        _, text = self.request("/metrics")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return None

    def wait_for_sample(self, name: str, condition, **labels) -> float | None:
        deadline = time.monotonic() + POLL_TIMEOUT
        value = self.sample(name, **labels)
        while not (value is not None and condition(value)) and time.monotonic() < deadline:
            time.sleep(0.1)
            value = self.sample(name, **labels)
        return value

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self._log.close()


class CredentialRecorder(BaseHTTPRequestHandler):
    """Request handler that returns HTTP 503 to every query and records its Authorization header."""

    received: list[str] = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        CredentialRecorder.received.append(self.headers.get("Authorization", ""))
        body = json.dumps({"status": "error", "errorType": "unavailable", "error": "warming up"}).encode()
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def recorder():
    server = ThreadingHTTPServer(("127.0.0.1", 0), CredentialRecorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """One exporter shared by the service tests; each test writes the configuration it needs."""
    folder = tmp_path_factory.mktemp("service")
    (folder / "token").write_text(TOKEN + "\n")
    (folder / "password").write_text(PASSWORD + "\n")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    refused = f"http://127.0.0.1:{holder.getsockname()[1]}"
    path = write(folder / "exporter.yml", config(refused, "cpu", bearer_token_file="token"))
    exporter = RunningExporter(path, folder / "stderr.log")
    exporter.refused_url = refused
    yield exporter
    exporter.stop()
    holder.close()


def reload(service, data) -> tuple[int, str]:
    write(service.config_path, data)
    return service.request("/-/reload", method="POST")


def test_run_healthy(service):
    status, _ = service.request("/-/healthy")

    assert status == 200


def test_run_ready(service):
    status, _ = service.request("/-/ready")

    assert status == 200


def test_run_source_down(service):
    failures = service.wait_for_sample(
        "anomaly_exporter_runs_total", lambda v: v >= 1, detector="cpu", phase="fit", result="failure"
    )

    assert failures is not None
    assert failures >= 1
    assert service.sample("anomaly_exporter_source_up") == 0


def test_run_reload_invalid(service):
    valid = config(service.refused_url, "cpu", bearer_token_file="token")
    broken = config(service.refused_url, "cpu", bearer_token_file="token")
    broken["detectors"][0]["fit_window"] = "5 minutes"
    assert reload(service, valid)[0] == 200
    runs_before = service.wait_for_sample(
        "anomaly_exporter_runs_total", lambda v: v >= 1, detector="cpu", phase="score", result="failure"
    )

    status, body = reload(service, broken)
    runs_after = service.wait_for_sample(
        "anomaly_exporter_runs_total", lambda v: v > runs_before, detector="cpu", phase="score", result="failure"
    )

    assert status == 400
    assert "detectors[0].fit_window" in body
    assert service.sample("anomaly_exporter_config_last_reload_successful") == 0
    assert service.request("/-/healthy")[0] == 200
    assert runs_before is not None
    assert runs_after > runs_before


def test_run_reload_adds_detector(service):
    status, _ = reload(service, config(service.refused_url, "cpu", "mem", bearer_token_file="token"))
    runs = service.wait_for_sample(
        "anomaly_exporter_runs_total", lambda v: v >= 1, detector="mem", phase="fit", result="failure"
    )

    assert status == 200
    assert runs is not None
    assert runs >= 1
    assert service.sample("anomaly_exporter_config_last_reload_successful") == 1


def test_run_sighup_reload(service):
    write(service.config_path, config(service.refused_url, "cpu", "disk", bearer_token_file="token"))

    service.process.send_signal(signal.SIGHUP)
    runs = service.wait_for_sample(
        "anomaly_exporter_runs_total", lambda v: v >= 1, detector="disk", phase="fit", result="failure"
    )

    assert runs is not None
    assert runs >= 1
    assert service.sample("anomaly_exporter_config_last_reload_successful") == 1
    assert service.process.poll() is None


def test_run_secrets_not_logged(service, recorder):
    # Both credentials reach the server, whose 503 responses make every run fail and log an error.
    CredentialRecorder.received.clear()
    basic = config(recorder, "cpu", basic_auth={"username": "reader", "password_file": "password"})
    bearer = config(recorder, "cpu", bearer_token_file="token")
    for data, scheme in ((basic, "Basic "), (bearer, "Bearer ")):
        assert reload(service, data)[0] == 200
        deadline = time.monotonic() + POLL_TIMEOUT
        while not any(h.startswith(scheme) for h in CredentialRecorder.received) and time.monotonic() < deadline:
            time.sleep(0.1)
    log = service.log()

    basic_header = "Basic " + base64.b64encode(f"reader:{PASSWORD}".encode()).decode()
    assert f"Bearer {TOKEN}" in CredentialRecorder.received
    assert basic_header in CredentialRecorder.received
    assert "503" in log
    assert TOKEN not in log
    assert PASSWORD not in log


def test_run_sigterm_exits_zero(tmp_path, refused_url):
    exporter = RunningExporter(write(tmp_path / "c.yml", config(refused_url, "cpu")), tmp_path / "stderr.log")
    assert exporter.request("/-/ready")[0] == 200

    returncode = exporter.stop()

    assert returncode == 0
    assert "stopped" in exporter.log()
    assert "Traceback" not in exporter.log()
