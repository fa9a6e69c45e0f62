"""Read-only client of a Prometheus-compatible query API, returning panels.

Long ranges are split into chunks below the API's points-per-series limit, requests retry
with backoff on timeouts, connection errors and 5xx answers, and a 4xx answer (bad PromQL,
for example) raises QueryError with the server's own message.
"""

import ast
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

from exporter.config import SourceConfig

log = logging.getLogger(__name__)

_STATUS_AND_BODY = re.compile(r"HTTP Status Code (\d+) \((b'.*'|b\".*\")\)$", re.DOTALL)


class QueryError(Exception):
    """The server rejected a query (HTTP 4xx); retrying will not help."""


class SourceUnavailable(Exception):
    """The query API could not be reached or kept failing after the retries."""


@dataclass
class Panel:
    """Query result on a regular grid: ``values[i, j]`` is series ``labels[i]`` at ``timestamps[j]``."""

    values: np.ndarray
    timestamps: np.ndarray
    labels: list[dict[str, str]]
    non_finite_points: int = 0
    duplicate_series: int = field(default=0)

    @property
    def empty(self) -> bool:
        return not self.labels


def grid(start: float, end: float, step: float) -> np.ndarray:
    """Return the timestamps Prometheus evaluates for a range query (start, start+step, ... <= end)."""
    count = int(math.floor((end - start) / step + 1e-9)) + 1
    return start + step * np.arange(max(count, 0), dtype=np.float64)


def _server_message(error: PrometheusApiClientException) -> tuple[int | None, str]:
    """Extract the HTTP status and the API's ``error`` text from the client's exception.

    prometheus-api-client formats the exception as ``HTTP Status Code <status> (<body!r>)``,
    so the body is recovered from its bytes repr and read as JSON, which keeps quotes and
    non-ASCII characters of the message intact.
    """
    text = str(error)
    match = _STATUS_AND_BODY.match(text)
    if match is None:
        return None, text
    status = int(match.group(1))
    try:
        body = ast.literal_eval(match.group(2)).decode("utf-8", errors="replace")
    except (ValueError, SyntaxError):
        return status, match.group(2)
    try:
        message = json.loads(body).get("error")
    except (ValueError, AttributeError):
        message = None
    return status, message if isinstance(message, str) else body.strip()


class PrometheusSource:
    """Range queries against one query API, shared by every detector.

    ``max_concurrent_queries`` bounds the requests in flight across all detectors, and
    ``up`` reports whether the last request reached the API and got a response other than 5xx.
    """

    def __init__(self, config: SourceConfig):
        self.config = config
        self.up = None
        self._slots = threading.BoundedSemaphore(config.max_concurrent_queries)
        self._client = PrometheusConnect(
            url=config.url,
            headers=self._headers(),
            retry=Retry(total=0, raise_on_status=False),
            auth=self._basic_auth(),
            session=self._session(),
            timeout=config.timeout,
            method="POST",
        )

    def _headers(self) -> dict[str, str]:
        headers = dict(self.config.headers)
        if self.config.bearer_token_file is not None:
            token = self.config.bearer_token_file.read_text(encoding="utf-8").strip()
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _basic_auth(self):
        auth = self.config.basic_auth
        if auth is None:
            return None
        password = auth.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        return (auth.username, password)

    def _session(self) -> requests.Session:
        session = requests.Session()
        tls = self.config.tls
        # requests takes False (no checks), a CA bundle path, or True (the system CAs).
        if tls.insecure_skip_verify:
            session.verify = False
        elif tls.ca_file is not None:
            session.verify = str(tls.ca_file)
        else:
            session.verify = True
        if tls.cert_file is not None:
            session.cert = (str(tls.cert_file), str(tls.key_file))
        return session

    def close(self) -> None:
        self._client._session.close()

    def query_range(self, query: str, start: float, end: float, step: float) -> Panel:
        """Run a range query, chunked, and assemble the responses on one time grid."""
        timestamps = grid(start, end, step)
        max_points = self.config.max_points_per_query
        rows: dict[tuple, np.ndarray] = {}
        labels: dict[tuple, dict[str, str]] = {}
        non_finite = 0
        # Series dropped per label set. Every chunk returns the same duplicates, so the
        # largest count in one chunk is the number of series dropped.
        duplicates: dict[tuple, int] = {}

        for first in range(0, timestamps.size, max_points):
            chunk = timestamps[first : first + max_points]
            result = self._request(query, float(chunk[0]), float(chunk[-1]), step)
            seen_in_chunk = set()
            duplicates_in_chunk: dict[tuple, int] = {}
            for series in result:
                metric = {k: v for k, v in series.get("metric", {}).items() if k != "__name__"}
                key = tuple(sorted(metric.items()))
                if key in seen_in_chunk:
                    duplicates_in_chunk[key] = duplicates_in_chunk.get(key, 0) + 1
                    continue
                seen_in_chunk.add(key)
                row = rows.get(key)
                if row is None:
                    row = rows[key] = np.full(timestamps.size, np.nan)
                    labels[key] = metric
                non_finite += self._fill_row(row, series.get("values", []), start, step)
            for key, count in duplicates_in_chunk.items():
                duplicates[key] = max(duplicates.get(key, 0), count)

        keys = list(rows)
        values = np.vstack([rows[k] for k in keys]) if keys else np.empty((0, timestamps.size))
        return Panel(values, timestamps, [labels[k] for k in keys], non_finite, sum(duplicates.values()))

    @staticmethod
    def _fill_row(row: np.ndarray, samples: list, start: float, step: float) -> int:
        if not samples:
            return 0
        pairs = np.array(samples, dtype=object)
        times = pairs[:, 0].astype(np.float64)
        numbers = pairs[:, 1].astype(np.float64)
        index = np.rint((times - start) / step).astype(np.int64)
        inside = (index >= 0) & (index < row.size)
        finite = np.isfinite(numbers)
        row[index[inside & finite]] = numbers[inside & finite]
        return int(np.count_nonzero(inside & ~finite))

    def _request(self, query: str, start: float, end: float, step: float) -> list:
        attempts = self.config.max_retries + 1
        delay = 0.5
        for attempt in range(1, attempts + 1):
            try:
                with self._slots:
                    # custom_query_range rounds start and end to whole seconds, which moves a
                    # fractional grid, but ``params`` overrides them. Times, step and timeout go
                    # as float seconds, because Prometheus 2.42 rejects a duration such as "1.5s".
                    # NOTE: the override relies on prometheus-api-client 0.7 merging ``params``
                    # last; tests/test_source.py checks the evaluation times.
                    result = self._client.custom_query_range(
                        query,
                        start_time=_utc(start),
                        end_time=_utc(end),
                        step=repr(float(step)),
                        params={
                            "start": repr(float(start)),
                            "end": repr(float(end)),
                            "timeout": repr(float(self.config.timeout)),
                        },
                    )
                self.up = True
                return result
            except PrometheusApiClientException as error:
                status, message = _server_message(error)
                if status in (401, 403):
                    # Reachable but unusable for every detector: report the source as down.
                    self.up = False
                    raise QueryError(
                        f"query API rejected the credentials with HTTP {status}: {message}; "
                        "check bearer_token_file, basic_auth or headers"
                    ) from None
                if status is not None and 400 <= status < 500 and status != 429:
                    self.up = True
                    raise QueryError(f"query rejected with HTTP {status}: {message}") from None
                reason = f"HTTP {status}: {message}" if status else message
            except requests.Timeout:
                reason = f"timed out after {self.config.timeout:g}s"
            except requests.RequestException as error:
                reason = f"request failed: {type(error).__name__}: {_short(error)}"
            except ValueError as error:
                reason = (f"invalid response, not the JSON of a Prometheus query API ({_short(error)}): "
                          "check that source.url points at the API root, such as http://prometheus:9090")
            self.up = False
            if attempt == attempts:
                raise SourceUnavailable(f"{self.config.url} {reason} (after {attempts} attempts)")
            log.warning("query to %s failed (%s); retry %d of %d in %.1fs", self.config.url, reason, attempt, attempts - 1, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")


def _short(error: Exception) -> str:
    """Reduce a requests/urllib3 error to its cause, such as "[Errno 111] Connection refused"."""
    text = str(error)
    cause = re.search(r"\[(?:Errno -?\d+|SSL: \w+)\] [^'\"()]+", text)
    if cause:
        return cause.group(0).strip()
    return text if len(text) <= 200 else text[:200] + "..."


def _utc(seconds: float):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(seconds, tz=timezone.utc)
