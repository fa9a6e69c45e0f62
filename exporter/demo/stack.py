"""Run real Prometheus and Alertmanager processes on 127.0.0.1.

The demo and the integration tests use this module to build a throwaway
monitoring stack. It writes history as OpenMetrics text and backfills it into a
TSDB directory with promtool. It starts Prometheus and Alertmanager on free
local ports, and an in-process webhook receiver collects the notifications.

Every server started here listens on 127.0.0.1 only. The process classes are
context managers. Leaving the ``with`` block, calling ``close()`` or exiting
the interpreter stops the process and deletes the temporary directories the
object created.

Written against the Debian packages of Prometheus 2.42 and Alertmanager 0.25.
"""

from __future__ import annotations

import contextlib
import copy
import http.server
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple, Self

import numpy as np
import requests
import yaml

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
INSTALL_HINT = "apt-get install -y --no-install-recommends prometheus prometheus-alertmanager"

# promtool picks the largest block range 2h * 3**k that fits this maximum
# (getCompatibleBlockDuration in cmd/promtool), so 744h (31 days) gives 486h
# blocks. Prometheus 2.42 compacts its own blocks up to min(31d, retention / 10)
# (cmd/prometheus/main.go), so with a retention of 310 days or more a 486h block
# is no larger than the blocks Prometheus makes itself.
DEFAULT_MAX_BLOCK_DURATION = "744h"

_METRIC_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_DURATION_RE = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")
_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
_LOG_TAIL_BYTES = 8192


class StackError(RuntimeError):
    """Base class of the errors raised by this module."""


class BinaryNotFoundError(StackError):
    """A Prometheus or Alertmanager executable is not on PATH."""


class BackfillError(StackError):
    """promtool failed to create TSDB blocks."""


class ProcessStartError(StackError):
    """A server process exited or timed out before it reported ready."""


class _PortInUseError(ProcessStartError):
    """The server could not bind its port because another process uses it."""


# ---------------------------------------------------------------------------
# Binaries and ports
# ---------------------------------------------------------------------------


def find_binary(*names: str) -> str:
    """Return the path of the first of ``names`` found on PATH.

    A name containing a path separator is checked as a path instead.
    Raises BinaryNotFoundError, naming the Debian packages to install.
    """
    if not names:
        raise ValueError("find_binary() needs at least one executable name")
    for name in names:
        if os.sep in name:
            if os.path.isfile(name) and os.access(name, os.X_OK):
                return name
            continue
        path = shutil.which(name)
        if path is not None:
            return path
    if len(names) == 1:
        missing = f"executable {names[0]} was not found"
    else:
        missing = f"none of the executables {', '.join(names)} was found"
    raise BinaryNotFoundError(f"{missing} on PATH ({os.environ.get('PATH', '')}); install it with: {INSTALL_HINT}")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when this function checked it.

    The port is released before the function returns, so another process can
    take it before the caller binds it. The process classes retry with a new
    port when that happens on their first start.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def _format_duration(value: str | float, field: str) -> str:
    """Convert seconds or a Prometheus duration string to a Prometheus duration string."""
    if isinstance(value, str):
        if not _DURATION_RE.fullmatch(value):
            raise ValueError(f"invalid duration for {field}: {value!r}; expected e.g. '15s', '500ms' or '1h'")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"invalid duration for {field}: {value!r}; expected seconds or a string like '15s'")
    if not value >= 0:
        raise ValueError(f"invalid duration for {field}: {value!r}; it must be a non-negative number of seconds")
    if float(value).is_integer():
        return f"{int(value)}s"
    return f"{round(value * 1000)}ms"


def _child_environment() -> dict[str, str]:
    """Return the environment for child processes, without proxy variables.

    The servers only talk to 127.0.0.1, and a proxy from the environment would
    route that traffic elsewhere.
    """
    return {key: value for key, value in os.environ.items() if key.lower() not in _PROXY_VARIABLES}


def _local_session() -> requests.Session:
    """Return a requests session that ignores proxy settings from the environment."""
    session = requests.Session()
    session.trust_env = False
    return session


# ---------------------------------------------------------------------------
# OpenMetrics text for promtool backfill
# ---------------------------------------------------------------------------


class Series(NamedTuple):
    """One series to backfill: timestamps in Unix seconds, values as floats.

    Any 4-tuple in the same field order is accepted where a Series is expected.
    """

    name: str
    labels: Mapping[str, str]
    timestamps: np.ndarray
    values: np.ndarray


class _PreparedSeries(NamedTuple):
    prefix: str
    timestamps: np.ndarray
    values: np.ndarray


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _series_prefix(name: str, labels: Mapping[str, str]) -> str:
    """Return ``name{label="value",...} `` with labels sorted by name."""
    if not isinstance(name, str) or not _METRIC_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid metric name {name!r}; it must match {_METRIC_NAME_RE.pattern}")
    pairs = []
    for label_name in sorted(labels):
        label_value = labels[label_name]
        if not isinstance(label_name, str) or not _LABEL_NAME_RE.fullmatch(label_name):
            raise ValueError(f"invalid label name {label_name!r} on {name}; it must match {_LABEL_NAME_RE.pattern}")
        if label_name == "__name__":
            raise ValueError(f"label __name__ on {name} is not allowed; pass the metric name as the series name")
        if not isinstance(label_value, str):
            raise TypeError(f"label {label_name} on {name} has value {label_value!r}; label values must be str")
        pairs.append(f'{label_name}="{_escape_label_value(label_value)}"')
    if not pairs:
        return f"{name} "
    return f"{name}{{{','.join(pairs)}}} "


def _prepare_series(series: Series | Sequence[Any]) -> _PreparedSeries:
    """Validate one series and drop its NaN samples."""
    name, labels, timestamps, values = series
    prefix = _series_prefix(name, labels)
    timestamps = np.asarray(timestamps, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if timestamps.ndim != 1 or timestamps.shape != values.shape:
        raise ValueError(
            f"series {prefix.strip()}: timestamps and values must be 1-D arrays of equal length, "
            f"got shapes {timestamps.shape} and {values.shape}"
        )
    if not np.all(np.isfinite(timestamps)) or np.any(timestamps < 0):
        raise ValueError(f"series {prefix.strip()}: timestamps must be finite Unix seconds >= 0")

    keep = ~np.isnan(values)
    timestamps = timestamps[keep]
    values = values[keep]

    # The TSDB stores milliseconds, and promtool 2.42 silently drops a sample
    # that is not newer than the previous one of its series.
    milliseconds = np.round(timestamps * 1000).astype(np.int64)
    if np.any(np.diff(milliseconds) <= 0):
        position = int(np.flatnonzero(np.diff(milliseconds) <= 0)[0]) + 1
        raise ValueError(
            f"series {prefix.strip()}: timestamps must be strictly increasing at millisecond "
            f"resolution, but sample {position} ({timestamps[position]}) is not after the previous one"
        )
    return _PreparedSeries(prefix, timestamps, values)


def _group_families(series: Iterable[Series | Sequence[Any]]) -> dict[str, list[_PreparedSeries]]:
    """Validate all series and group them by metric name, keeping first-seen order.

    OpenMetrics requires the samples of one metric family to be contiguous.
    """
    families: dict[str, list[_PreparedSeries]] = {}
    seen_prefixes: set[str] = set()
    for item in series:
        prepared = _prepare_series(item)
        if prepared.prefix in seen_prefixes:
            raise ValueError(f"duplicate series {prepared.prefix.strip()}; merge its samples into one series")
        seen_prefixes.add(prepared.prefix)
        if len(prepared.values) == 0:
            continue
        families.setdefault(item[0], []).append(prepared)
    return families


def _format_timestamps(timestamps: np.ndarray) -> list[str] | list[int]:
    """Format timestamps so that promtool reads back the intended millisecond.

    promtool (Prometheus 2.42) converts a timestamp with int64(seconds * 1000),
    which truncates. Of 2 million random millisecond timestamps written with
    three decimals, 0.6 % came back 1 ms early. Writing the middle of the
    millisecond (a trailing 5) avoids that. Whole seconds are written as
    integers, which convert exactly.
    """
    if np.all(timestamps == np.floor(timestamps)):
        return timestamps.astype(np.int64).tolist()
    milliseconds = np.round(timestamps * 1000).astype(np.int64)
    seconds, remainders = np.divmod(milliseconds, 1000)
    return [f"{whole}.{part:03d}5" for whole, part in zip(seconds.tolist(), remainders.tolist())]


def _format_values(values: np.ndarray) -> list[str]:
    # repr() of a Python float is the shortest text that parses back to the same float.
    texts = [repr(value) for value in values.tolist()]
    for index in np.flatnonzero(np.isinf(values)).tolist():
        texts[index] = "+Inf" if values[index] > 0 else "-Inf"
    return texts


def _sample_lines(prepared: _PreparedSeries) -> list[str]:
    prefix = prepared.prefix
    timestamps = _format_timestamps(prepared.timestamps)
    values = _format_values(prepared.values)
    return [f"{prefix}{value} {timestamp}" for value, timestamp in zip(values, timestamps)]


def openmetrics_lines(series: Iterable[Series | Sequence[Any]]) -> Iterator[str]:
    """Yield the OpenMetrics text for ``series`` line by line, without newlines.

    Each metric family gets a ``# TYPE <name> gauge`` line followed by the
    samples of all its series, and the last line is ``# EOF``. NaN values are
    skipped. A series left without samples is omitted, and so is a family
    whose series are all empty. All series are validated before the first line
    is yielded, so invalid input raises ValueError or TypeError without output.
    """
    families = _group_families(series)
    for name, members in families.items():
        yield f"# TYPE {name} gauge"
        for prepared in members:
            yield from _sample_lines(prepared)
    yield "# EOF"


def write_openmetrics(series: Iterable[Series | Sequence[Any]], path: str | os.PathLike[str]) -> int:
    """Write ``series`` as OpenMetrics text to ``path`` and return the number of samples written.

    The output is the same as ``openmetrics_lines``, written one series at a time.
    """
    families = _group_families(series)
    sample_count = 0
    with open(path, "w", encoding="utf-8", newline="\n") as output:
        for name, members in families.items():
            output.write(f"# TYPE {name} gauge\n")
            for prepared in members:
                lines = _sample_lines(prepared)
                output.write("\n".join(lines))
                output.write("\n")
                sample_count += len(lines)
        output.write("# EOF\n")
    return sample_count


def backfill(
    openmetrics_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    *,
    max_block_duration: str = DEFAULT_MAX_BLOCK_DURATION,
    promtool: str | None = None,
    timeout: float = 600.0,
) -> str:
    """Create TSDB blocks in ``data_dir`` from an OpenMetrics file and return promtool's output.

    Run this before Prometheus starts on ``data_dir``, or restart Prometheus
    afterwards: a running Prometheus only loads new blocks on its next block
    reload. Prometheus 2.42 loads blocks that overlap each other or the head
    block without extra flags.

    ``max_block_duration`` is promtool's hidden ``--max-block-duration`` flag.
    promtool parses the whole input once per block, so the default 2h blocks
    make a backfill of several days many times slower.
    Raises BackfillError with promtool's output when promtool fails.
    """
    promtool = promtool or find_binary("promtool")
    max_block_duration = _format_duration(max_block_duration, "max_block_duration")
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    command = [
        promtool,
        "tsdb",
        "create-blocks-from",
        "openmetrics",
        f"--max-block-duration={max_block_duration}",
        os.fspath(openmetrics_path),
        os.fspath(data_dir),
    ]
    logger.info("backfilling %s into %s", openmetrics_path, data_dir)
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_child_environment(),
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise BackfillError(f"promtool backfill timed out after {timeout} s: {shlex.join(command)}") from error
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        raise BackfillError(
            f"promtool backfill failed with exit code {result.returncode}: {shlex.join(command)}\n{output}"
        )
    return output


def backfill_series(
    series: Iterable[Series | Sequence[Any]],
    data_dir: str | os.PathLike[str],
    *,
    max_block_duration: str = DEFAULT_MAX_BLOCK_DURATION,
    promtool: str | None = None,
) -> int:
    """Backfill ``series`` into ``data_dir`` through a temporary OpenMetrics file.

    Returns the number of samples written. Raises like ``write_openmetrics`` and ``backfill``.
    """
    with tempfile.TemporaryDirectory(prefix="anomaly-exporter-backfill-") as directory:
        path = Path(directory) / "series.om"
        sample_count = write_openmetrics(series, path)
        backfill(path, data_dir, max_block_duration=max_block_duration, promtool=promtool)
    return sample_count


# ---------------------------------------------------------------------------
# Server processes
# ---------------------------------------------------------------------------


class _Resources:
    """Process, log file and owned directories of one server object.

    Kept apart from the server object so that ``weakref.finalize`` can release
    them without holding a reference to that object.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        self.log_file: IO[bytes] | None = None
        self.owned_dirs: list[Path] = []

    def stop_process(self, timeout: float) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) did not exit within %s s of SIGTERM; killing it", self.name, process.pid, timeout)
                process.kill()
                process.wait()
            logger.info("stopped %s (pid %d, exit code %s)", self.name, process.pid, process.returncode)
        self.process = None
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    def release(self) -> None:
        self.stop_process(timeout=5.0)
        for directory in self.owned_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        self.owned_dirs.clear()


class _ServerProcess:
    """Lifecycle shared by Prometheus and Alertmanager.

    Subclasses write their configuration in ``_write_config`` and return their
    command line in ``_command``.
    """

    name = "server"

    def __init__(self, binary: str, port: int | None, start_timeout: float, stop_timeout: float) -> None:
        self.binary = binary
        self.port = port
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._port_fixed = port is not None
        self._closed = False
        self._log_offset = 0
        self._resources = _Resources(self.name)
        self._finalizer = weakref.finalize(self, self._resources.release)
        self.work_dir = Path(tempfile.mkdtemp(prefix=f"anomaly-exporter-{self.name}-"))
        self._resources.owned_dirs.append(self.work_dir)
        self.log_path = self.work_dir / f"{self.name}.log"

    # Subclass hooks.

    def _write_config(self) -> None:
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    # Public lifecycle.

    @property
    def url(self) -> str:
        """Base URL of the server, without a trailing slash."""
        if self.port is None:
            raise StackError(f"{self.name} has no port yet; call start() first or pass port=")
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def running(self) -> bool:
        process = self._resources.process
        return process is not None and process.poll() is None

    @property
    def pid(self) -> int | None:
        process = self._resources.process
        return None if process is None else process.pid

    def start(self) -> Self:
        """Start the process and wait until ``/-/ready`` returns 200.

        A restart after ``stop()`` reuses the same port and data. On the first
        start with an automatically chosen port, a port taken in the meantime
        is replaced by a new one, up to three attempts.
        Raises ProcessStartError with the tail of the log if the process exits
        or is not ready within ``start_timeout`` seconds.
        """
        if self._closed:
            raise StackError(f"{self.name} was closed; create a new object to start it again")
        if self.running:
            raise StackError(f"{self.name} is already running at {self.url} (pid {self.pid})")

        attempts = 1 if self._port_fixed else 3
        for attempt in range(1, attempts + 1):
            if self.port is None:
                self.port = free_port()
            try:
                self._launch()
                self._wait_ready()
            except _PortInUseError:
                self._resources.stop_process(self.stop_timeout)
                if attempt == attempts:
                    raise
                logger.warning("%s port %d was taken before it could bind; retrying with another port", self.name, self.port)
                self.port = None
                continue
            except BaseException:
                self._resources.stop_process(self.stop_timeout)
                raise
            break

        # Later starts must come back on the same port, which callers may have stored.
        self._port_fixed = True
        logger.info("%s is ready at %s (pid %d, log %s)", self.name, self.url, self.pid, self.log_path)
        return self

    def stop(self) -> None:
        """Stop the process with SIGTERM, and SIGKILL after ``stop_timeout`` seconds.

        The port, the data and the temporary directories are kept, so
        ``start()`` brings the server back where it was. Does nothing if the
        process is not running.
        """
        self._resources.stop_process(self.stop_timeout)

    def restart(self) -> None:
        """Stop the process and start it again on the same port with the same data."""
        self.stop()
        self.start()

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """Stop the server for the duration of the ``with`` block, then start it again."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def close(self) -> None:
        """Stop the process and delete the temporary directories this object created."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def log_tail(self, max_lines: int = 40) -> str:
        """Return the last ``max_lines`` lines of the process log."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - _LOG_TAIL_BYTES))
                text = log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-max_lines:])

    # Internals.

    def _launch(self) -> None:
        self._write_config()
        command = self._command()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log_file = open(self.log_path, "ab")
        log_file.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {shlex.join(command)}\n".encode())
        log_file.flush()
        self._resources.log_file = log_file
        logger.info("starting %s on %s:%d", self.name, LOCALHOST, self.port)
        self._resources.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=self.work_dir,
            env=_child_environment(),
        )

    def _log_since_launch(self) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            return log.read().decode("utf-8", errors="replace")

    def _wait_ready(self) -> None:
        process = self._resources.process
        assert process is not None
        ready_url = f"{self.url}/-/ready"
        deadline = time.monotonic() + self.start_timeout
        with _local_session() as session:
            while True:
                exit_code = process.poll()
                if exit_code is not None:
                    message = (
                        f"{self.name} exited with code {exit_code} before it was ready at {ready_url}; "
                        f"log {self.log_path} ends with:\n{self.log_tail()}"
                    )
                    if "address already in use" in self._log_since_launch():
                        raise _PortInUseError(message)
                    raise ProcessStartError(message)
                try:
                    response = session.get(ready_url, timeout=1.0)
                    if response.status_code == 200:
                        return
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise ProcessStartError(
                        f"timed out after {self.start_timeout} s waiting for {self.name} to be ready at {ready_url}; "
                        f"log {self.log_path} ends with:\n{self.log_tail()}"
                    )
                time.sleep(0.05)


def _scrape_config_entry(config: Mapping[str, Any]) -> dict[str, Any]:
    """Translate a short scrape config into a Prometheus ``scrape_configs`` entry.

    ``job_name`` is required. ``targets`` (a list of ``host:port``) and the
    optional ``labels`` become one ``static_configs`` entry. Durations may be
    numbers of seconds. Every other key is passed to Prometheus unchanged,
    for example ``honor_labels`` or ``metrics_path``.
    """
    entry = dict(config)
    job_name = entry.get("job_name")
    if not isinstance(job_name, str) or not job_name:
        raise ValueError(f"scrape config {config!r} needs a non-empty string job_name")
    targets = entry.pop("targets", None)
    labels = entry.pop("labels", None)
    if targets is not None:
        if isinstance(targets, str) or not all(isinstance(target, str) for target in targets) or not targets:
            raise ValueError(f"scrape config {job_name}: targets must be a non-empty list of 'host:port' strings")
        static_config: dict[str, Any] = {"targets": list(targets)}
        if labels:
            static_config["labels"] = dict(labels)
        entry.setdefault("static_configs", []).append(static_config)
    elif labels is not None:
        raise ValueError(f"scrape config {job_name}: labels need targets")
    for key in ("scrape_interval", "scrape_timeout"):
        if key in entry:
            entry[key] = _format_duration(entry[key], f"{job_name}.{key}")
    return entry


def _alertmanager_entry(url: str) -> dict[str, Any]:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"invalid Alertmanager URL {url!r}; expected e.g. http://127.0.0.1:9093")
    return {
        "scheme": parsed.scheme,
        "path_prefix": parsed.path or "/",
        "api_version": "v2",
        "static_configs": [{"targets": [parsed.netloc]}],
    }


def _resolve_rule_files(rule_files: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Return absolute rule file paths, because Prometheus resolves relative ones against its config dir."""
    resolved = []
    for rule_file in rule_files:
        path = Path(rule_file).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"rule file not found: {path}")
        resolved.append(path)
    return resolved


class PrometheusProcess(_ServerProcess):
    """A Prometheus server on 127.0.0.1 with a generated prometheus.yml.

    ``data_dir`` defaults to a temporary directory that ``close()`` deletes. A
    directory passed in is kept. ``scrape_configs`` are short scrape configs
    (see ``_scrape_config_entry``): ``job_name``, ``targets``, and optionally
    ``scrape_interval``, ``honor_labels`` or any other Prometheus scrape option.
    ``retention`` must cover the oldest backfilled sample, because Prometheus
    deletes blocks that end more than ``retention`` before the newest block.
    The lifecycle API (``/-/reload``, ``/-/quit``) is enabled.

    NOTE: Prometheus 2.42 applies new scrape targets on a fixed 5 s ticker
    (scrape/manager.go), so the first scrape comes about 5 s after start or reload.
    """

    name = "prometheus"

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        scrape_configs: Iterable[Mapping[str, Any]] = (),
        rule_files: Iterable[str | os.PathLike[str]] = (),
        alertmanager_url: str | None = None,
        evaluation_interval: str | float = "15s",
        scrape_interval: str | float = "15s",
        retention: str = "3650d",
        port: int | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        binary: str | None = None,
    ) -> None:
        binary = binary or find_binary("prometheus")
        # Validate everything before the base class creates the work directory.
        self.scrape_configs = [_scrape_config_entry(config) for config in scrape_configs]
        self.rule_files = _resolve_rule_files(rule_files)
        self.alertmanager_url = alertmanager_url
        if alertmanager_url is not None:
            _alertmanager_entry(alertmanager_url)
        self.evaluation_interval = _format_duration(evaluation_interval, "evaluation_interval")
        self.scrape_interval = _format_duration(scrape_interval, "scrape_interval")
        self.retention = _format_duration(retention, "retention")
        self.extra_args = list(extra_args)

        super().__init__(binary, port, start_timeout, stop_timeout)
        self.config_path = self.work_dir / "prometheus.yml"
        if data_dir is None:
            self.data_dir = self.work_dir / "data"
        else:
            self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def config(self) -> dict[str, Any]:
        """Return the prometheus.yml content as a dict."""
        config: dict[str, Any] = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "evaluation_interval": self.evaluation_interval,
            },
            "scrape_configs": copy.deepcopy(self.scrape_configs),
            "rule_files": [str(path) for path in self.rule_files],
        }
        if self.alertmanager_url is not None:
            config["alerting"] = {"alertmanagers": [_alertmanager_entry(self.alertmanager_url)]}
        return config

    def _write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False), encoding="utf-8")

    def _command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--storage.tsdb.retention.time={self.retention}",
            f"--web.listen-address={LOCALHOST}:{self.port}",
            f"--web.external-url=http://{LOCALHOST}:{self.port}/",
            "--web.enable-lifecycle",
            *self.extra_args,
        ]

    def reload(
        self,
        *,
        scrape_configs: Iterable[Mapping[str, Any]] | None = None,
        rule_files: Iterable[str | os.PathLike[str]] | None = None,
    ) -> None:
        """Rewrite prometheus.yml with the given changes and reload the running server.

        Raises StackError with Prometheus' message when it rejects the new config.
        """
        if scrape_configs is not None:
            self.scrape_configs = [_scrape_config_entry(config) for config in scrape_configs]
        if rule_files is not None:
            self.rule_files = _resolve_rule_files(rule_files)
        self._write_config()
        with _local_session() as session:
            response = session.post(f"{self.url}/-/reload", timeout=30)
        if response.status_code != 200:
            raise StackError(
                f"prometheus rejected the reload of {self.config_path} with HTTP {response.status_code}: "
                f"{response.text.strip()}\nlog ends with:\n{self.log_tail()}"
            )
        logger.info("reloaded prometheus config %s", self.config_path)

    def _api_get(self, path: str, params: Mapping[str, Any]) -> Any:
        with _local_session() as session:
            response = session.get(f"{self.url}{path}", params=params, timeout=60)
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict) or body.get("status") != "success":
            detail = body.get("error") if isinstance(body, dict) else response.text[:500]
            raise StackError(f"prometheus {path} with {dict(params)} failed with HTTP {response.status_code}: {detail}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Run an instant query and return its ``result`` list."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        return self._api_get("/api/v1/query", params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """Run a range query (times in Unix seconds, step in seconds) and return its ``result`` list."""
        params = {"query": expr, "start": start, "end": end, "step": step}
        return self._api_get("/api/v1/query_range", params)["result"]


class AlertmanagerProcess(_ServerProcess):
    """An Alertmanager on 127.0.0.1 that sends every notification to one webhook.

    Clustering is off (``--cluster.listen-address=`` with an empty value), so
    it binds no gossip port and sends notifications without waiting for peers.
    The short default intervals suit tests. A production setup would wait longer.
    ``inhibit_rules`` are Alertmanager ``inhibit_rules`` entries, passed through unchanged.
    """

    name = "alertmanager"

    def __init__(
        self,
        webhook_url: str,
        *,
        group_by: Sequence[str] = ("alertname",),
        group_wait: str | float = "1s",
        group_interval: str | float = "1s",
        repeat_interval: str | float = "1h",
        resolve_timeout: str | float = "5m",
        inhibit_rules: Iterable[Mapping[str, Any]] = (),
        send_resolved: bool = True,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        binary: str | None = None,
    ) -> None:
        # Debian names the binary prometheus-alertmanager; upstream archives name it alertmanager.
        binary = binary or find_binary("prometheus-alertmanager", "alertmanager")
        parsed = urllib.parse.urlsplit(webhook_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"invalid webhook URL {webhook_url!r}; expected e.g. http://127.0.0.1:8080/webhook")
        self.webhook_url = webhook_url
        self.group_by = list(group_by)
        self.group_wait = _format_duration(group_wait, "group_wait")
        self.group_interval = _format_duration(group_interval, "group_interval")
        self.repeat_interval = _format_duration(repeat_interval, "repeat_interval")
        self.resolve_timeout = _format_duration(resolve_timeout, "resolve_timeout")
        self.inhibit_rules = [dict(rule) for rule in inhibit_rules]
        self.send_resolved = send_resolved
        self.extra_args = list(extra_args)

        super().__init__(binary, port, start_timeout, stop_timeout)
        self.config_path = self.work_dir / "alertmanager.yml"
        self.storage_dir = self.work_dir / "data"

    def config(self) -> dict[str, Any]:
        """Return the alertmanager.yml content as a dict."""
        config: dict[str, Any] = {
            "global": {"resolve_timeout": self.resolve_timeout},
            "route": {
                "receiver": "webhook",
                "group_by": list(self.group_by),
                "group_wait": self.group_wait,
                "group_interval": self.group_interval,
                "repeat_interval": self.repeat_interval,
            },
            "receivers": [
                {
                    "name": "webhook",
                    "webhook_configs": [{"url": self.webhook_url, "send_resolved": self.send_resolved}],
                }
            ],
        }
        if self.inhibit_rules:
            config["inhibit_rules"] = copy.deepcopy(self.inhibit_rules)
        return config

    def _write_config(self) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False), encoding="utf-8")

    def _command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.path={self.storage_dir}",
            f"--web.listen-address={LOCALHOST}:{self.port}",
            f"--web.external-url=http://{LOCALHOST}:{self.port}/",
            "--cluster.listen-address=",
            *self.extra_args,
        ]

    def post_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        """Send alerts to the v2 API (``POST /api/v2/alerts``), as Prometheus does.

        Each alert needs ``labels`` and may have ``annotations``, ``startsAt``,
        ``endsAt`` (RFC 3339) and ``generatorURL``. Raises StackError on a non-200 response.
        """
        with _local_session() as session:
            response = session.post(f"{self.url}/api/v2/alerts", json=list(alerts), timeout=30)
        if response.status_code != 200:
            raise StackError(f"alertmanager rejected the alerts with HTTP {response.status_code}: {response.text.strip()}")

    def get_alerts(self) -> list[dict[str, Any]]:
        """Return the alerts stored in Alertmanager (``GET /api/v2/alerts``), including their ``status``."""
        with _local_session() as session:
            response = session.get(f"{self.url}/api/v2/alerts", timeout=30)
        if response.status_code != 200:
            raise StackError(f"alertmanager GET /api/v2/alerts failed with HTTP {response.status_code}: {response.text.strip()}")
        return response.json()


# ---------------------------------------------------------------------------
# Webhook receiver
# ---------------------------------------------------------------------------


class _WebhookHandler(http.server.BaseHTTPRequestHandler):
    server: _WebhookServer

    def do_POST(self) -> None:  # noqa: N802 (name fixed by BaseHTTPRequestHandler)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        try:
            payload = json.loads(body)
        except ValueError as error:
            logger.warning("webhook receiver rejected a request to %s that is not JSON: %s", self.path, error)
            self.send_response(400)
            self.end_headers()
            return
        if not isinstance(payload, dict):
            logger.warning("webhook receiver rejected a JSON %s on %s; expected an object", type(payload).__name__, self.path)
            self.send_response(400)
            self.end_headers()
            return
        self.server.record(payload)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature fixed by the base class)
        logger.debug("webhook receiver: " + format, *args)


class _WebhookServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], record: Callable[[dict[str, Any]], None]) -> None:
        super().__init__(address, _WebhookHandler)
        self.record = record


class WebhookReceiver:
    """HTTP server on 127.0.0.1 that stores the JSON payloads Alertmanager's webhook sends.

    It accepts POST on any path. Use it as a context manager, or call
    ``start()`` and ``stop()``. The serving thread is a daemon thread, so a
    receiver that is never stopped does not block interpreter exit.
    """

    def __init__(self, port: int = 0, path: str = "/webhook") -> None:
        self._requested_port = port
        self._path = path
        self._payloads: list[dict[str, Any]] = []
        self._condition = threading.Condition()
        self._server: _WebhookServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """URL to put in Alertmanager's ``webhook_configs``."""
        if self._server is None:
            raise StackError("webhook receiver is not running; call start() first")
        return f"http://{LOCALHOST}:{self._server.server_address[1]}{self._path}"

    def start(self) -> Self:
        """Start serving in a daemon thread and return self."""
        if self._server is not None:
            raise StackError(f"webhook receiver is already running at {self.url}")
        self._server = _WebhookServer((LOCALHOST, self._requested_port), self._record)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="webhook-receiver",
            daemon=True,
        )
        self._thread.start()
        logger.info("webhook receiver listening at %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and join the thread. Does nothing if not running."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        logger.info("webhook receiver stopped")
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _record(self, payload: dict[str, Any]) -> None:
        with self._condition:
            self._payloads.append(payload)
            self._condition.notify_all()

    def payloads(self) -> list[dict[str, Any]]:
        """Return copies of the payloads received so far, oldest first."""
        with self._condition:
            return copy.deepcopy(self._payloads)

    def alerts(self) -> list[dict[str, Any]]:
        """Return the alerts of all payloads received so far, oldest first.

        Each alert is a dict with ``status``, ``labels``, ``annotations``,
        ``startsAt``, ``endsAt``, ``fingerprint`` and the payload's ``receiver``.
        """
        with self._condition:
            return self._flatten(self._payloads)

    def clear(self) -> None:
        """Forget the payloads received so far."""
        with self._condition:
            self._payloads.clear()

    @staticmethod
    def _flatten(payloads: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        alerts = []
        for payload in payloads:
            for alert in payload.get("alerts") or []:
                alerts.append(
                    {
                        "status": alert.get("status"),
                        "labels": dict(alert.get("labels") or {}),
                        "annotations": dict(alert.get("annotations") or {}),
                        "startsAt": alert.get("startsAt"),
                        "endsAt": alert.get("endsAt"),
                        "fingerprint": alert.get("fingerprint"),
                        "receiver": payload.get("receiver"),
                    }
                )
        return alerts

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until at least one received alert satisfies ``predicate`` and return all that do.

        ``predicate`` gets one flattened alert (see ``alerts()``). Raises
        TimeoutError after ``timeout`` seconds, listing the alerts received.
        """
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                received = self._flatten(self._payloads)
                matches = [alert for alert in received if predicate(alert)]
                if matches:
                    return matches
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # Re-check at least every 0.1 s even without a new payload.
                self._condition.wait(timeout=min(remaining, 0.1))
        summary = [{"status": alert["status"], "labels": alert["labels"]} for alert in received]
        raise TimeoutError(
            f"timed out after {timeout} s waiting for a matching alert at {self.url}; "
            f"received {len(received)} alerts: {json.dumps(summary)[:2000]}"
        )


# ---------------------------------------------------------------------------
# The whole alerting path, for the demo and the end-to-end tests
# ---------------------------------------------------------------------------


class AlertingStack:
    """Alertmanager with a webhook receiver, Prometheus with rules, and the exporter as a child process.

    Prometheus runs on ``tsdb`` (backfill it first) and scrapes the simulator at
    ``simulator_target`` under job ``simulator_job`` and the exporter under job
    ``anomaly-exporter`` with ``honor_labels``. ``exporter_config`` is the exporter's
    configuration without ``source.url`` and ``listen_address``, which are filled in here.
    The exporter listens on ``exporter_port`` of 127.0.0.1, a free port when it is 0.
    Use it as a context manager: leaving the block stops every process.
    """

    def __init__(
        self,
        work: str | os.PathLike[str],
        *,
        tsdb: str | os.PathLike[str],
        simulator_target: str,
        rule_groups: Mapping[str, Any],
        exporter_config: Mapping[str, Any],
        simulator_job: str = "demo",
        interval: str = "1s",
        inhibit_rules: Iterable[Mapping[str, Any]] = (),
        exporter_port: int = 0,
    ) -> None:
        self.work = Path(work)
        self.tsdb = Path(tsdb)
        self.simulator_target = simulator_target
        self.rule_groups = dict(rule_groups)
        self.exporter_settings = dict(exporter_config)
        self.simulator_job = simulator_job
        self.interval = interval
        self.inhibit_rules = list(inhibit_rules)
        self.receiver: WebhookReceiver | None = None
        self.alertmanager: AlertmanagerProcess | None = None
        self.prometheus: PrometheusProcess | None = None
        self.exporter: subprocess.Popen[bytes] | None = None
        self.exporter_port = exporter_port or free_port()
        self.log_path = self.work / "exporter.log"
        self.config_path = self.work / "exporter.yml"
        self.started = 0.0

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.exporter_port}/metrics"

    def start(self) -> Self:
        """Start the receiver, Alertmanager, Prometheus and the exporter, in that order."""
        self.work.mkdir(parents=True, exist_ok=True)
        self.receiver = WebhookReceiver().start()
        self.alertmanager = AlertmanagerProcess(
            self.receiver.url, group_by=["alertname", "detector", "entity"], inhibit_rules=self.inhibit_rules
        ).start()
        rules_path = self.work / "rules.yml"
        rules_path.write_text(yaml.safe_dump(self.rule_groups, sort_keys=False), encoding="utf-8")
        self.prometheus = PrometheusProcess(
            self.tsdb,
            scrape_configs=[
                {"job_name": self.simulator_job, "targets": [self.simulator_target], "scrape_interval": self.interval},
                {"job_name": "anomaly-exporter", "targets": [f"127.0.0.1:{self.exporter_port}"],
                 "scrape_interval": self.interval, "honor_labels": True},
            ],
            rule_files=[rules_path],
            alertmanager_url=self.alertmanager.url,
            evaluation_interval=self.interval,
        ).start()

        config = dict(self.exporter_settings)
        config["source"] = {**config.get("source", {}), "url": self.prometheus.url}
        config["listen_address"] = f"127.0.0.1:{self.exporter_port}"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        root = Path(__file__).resolve().parents[2]
        environment = dict(os.environ, PYTHONPATH=str(root))
        self.started = time.time()
        with open(self.log_path, "wb") as log_file:
            self.exporter = subprocess.Popen(
                [sys.executable, "-m", "exporter", "run", "--config", str(self.config_path)],
                stdout=log_file, stderr=subprocess.STDOUT, env=environment,
            )
        return self

    def close(self) -> None:
        """Stop the exporter, then Prometheus, Alertmanager and the receiver."""
        if self.exporter is not None and self.exporter.poll() is None:
            self.exporter.terminate()
            try:
                self.exporter.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.exporter.kill()
        for server in (self.prometheus, self.alertmanager):
            if server is not None:
                server.close()
        if self.receiver is not None:
            self.receiver.stop()

    def exporter_log_tail(self, characters: int = 4000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-characters:]

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()
