"""Deterministic simulator of tenants, hosts and equipment for the demo and end-to-end tests.

Every value is a pure function of the seed, the series and the timestamp, so backfilled history
and the live ``/metrics`` endpoint agree at any instant and join without a seam. A value is

    level + daily_amplitude * daily_shape(hour of day, UTC) * weekend_factor (Saturday and Sunday)
          + noise * z + anomaly offsets, clipped to the series' bounds,

where z is a standard normal number drawn from a hash of (seed, series, timestamp bucket). The
bucket is ``noise_interval`` seconds wide (15 s by default), so two requests in the same bucket
see the same value.

The default scenario (``default_series`` and ``default_anomalies``):

| entity | metrics | daily cycle | anomalies |
|---|---|---|---|
| tenant ``shop`` (node-1) | tenant metrics | business hours 08-19 | clean; affected in the noisy-neighbour episode |
| tenant ``checkout`` (node-1) | tenant metrics | business hours 08-19 | clean; affected in the noisy-neighbour episode |
| tenant ``billing`` (node-2) | tenant metrics | business hours 09-17 | clean |
| tenant ``accounts`` (node-2) | tenant metrics | business hours 09-17 | clean |
| tenant ``search`` (node-2) | tenant metrics | evening peak at 20:00 | CPU spike, 30 min, 50 h before the reference time |
| tenant ``video`` (node-1) | tenant metrics | evening peak at 20:00 | clean |
| tenant ``chat`` (node-2) | tenant metrics | evening peak at 20:00 | clean |
| tenant ``reports`` (node-1) | tenant metrics | nightly job 02-05 | CPU drop to 10 % during the job on the night two days before |
| tenant ``etl`` (node-1) | tenant metrics | nightly job 02-05 | clean; noisy in the noisy-neighbour episode |
| tenant ``backup`` (node-2) | tenant metrics | nightly job 02-05 | clean |
| tenant ``analytics`` (node-2) | tenant metrics | nightly job 02-05 | clean |
| node ``node-1`` | cpu, memory utilisation | business hours 08-19 | CPU at 0.92 or more in the noisy-neighbour episode |
| node ``node-2`` | cpu, memory utilisation | evening peak at 20:00 | clean |
| host ``h1`` | cpu, memory | business hours 08-19, half the daytime rise at weekends | clean |
| host ``h2`` | cpu, memory | broad peak at 14:00 | clean: the end-to-end tests inject into it |
| host ``h3`` | cpu, memory | nightly batch 01-04 | clean |
| host ``h4`` | cpu, memory | evening peak at 20:00 | memory level shift for 8 h, 30 h before |
| equipment ``pump-1`` | machine metrics | nearly flat, warmest at 15:00 | clean |
| equipment ``pump-2`` | machine metrics | nearly flat, warmest at 15:00 | imbalance from 45 min before, never ending (optional): 1x band amplitude tripled, vibration level shift |
| equipment ``compressor-1`` | machine metrics | nearly flat, warmest at 16:00 | temperature spike, 20 min, 20 h before |

Tenant metrics are CPU cores, memory bytes, network bytes received and sent per second, requests
per second, the 95th percentile latency in seconds, and the tenant's pods per node (the
placement, a whole number). The business-hours and evening tenants serve many fast requests in
their busy hours, and the batch tenants run a nightly job with few, slower requests. The tenants
of one daily cycle (business hours, evening peak, nightly job) differ in size but not in shape,
so that they form a peer group. Node utilisation follows its own daily cycle and is not the sum
of its tenants' usage. Tenants have no weekly cycle, because the demo's tenant detector fits 3
days, too short to learn one.

Machine metrics are temperature, vibration RMS, motor current, shaft speed (pumps 1480 rpm, the
compressor 2960 rpm) and the vibration amplitude of 8 bands from 12.5 Hz to 100 Hz with the
band's centre in the label ``frequency_hz``. A healthy spectrum peaks at the band of the shaft
frequency (1x) and less at 2x.

``noisy_neighbour_episode`` builds the noisy-neighbour incident on node-1 for a chosen start,
which the demo and the dashboard tests place after the exporter's first fit.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Callable, Iterable, Iterator, Mapping, Sequence, Union
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400.0
GIB = float(2**30)
MIB = float(2**20)

ANOMALY_KINDS = ("spike", "level_shift", "drop")
MAGNITUDE_UNITS = ("noise", "relative")

# Label names that Prometheus attaches to every scraped series, so an entity must not use them.
RESERVED_LABELS = frozenset({"job", "instance"})

METRIC_HELP = {
    "demo_tenant_cpu_cores": "CPU used by a tenant's workloads, in cores (simulated).",
    "demo_tenant_memory_bytes": "Memory used by a tenant's workloads, in bytes (simulated).",
    "demo_tenant_network_receive_bytes_per_second": "Network traffic a tenant receives, in bytes per second (simulated).",
    "demo_tenant_network_transmit_bytes_per_second": "Network traffic a tenant sends, in bytes per second (simulated).",
    "demo_tenant_requests_per_second": "Requests a tenant's services answer, per second (simulated).",
    "demo_tenant_request_latency_p95_seconds": "95th percentile of a tenant's request latency, in seconds (simulated).",
    "demo_tenant_pods": "Pods of a tenant running on a node (simulated).",
    "demo_node_cpu_utilisation_ratio": "Share of a node's allocatable CPU in use, from 0 to 1 (simulated).",
    "demo_node_memory_utilisation_ratio": "Share of a node's allocatable memory in use, from 0 to 1 (simulated).",
    "demo_host_cpu_utilisation_ratio": "Share of a host's CPU time in use, from 0 to 1 (simulated).",
    "demo_host_memory_used_bytes": "Memory in use on a host, in bytes (simulated).",
    "demo_equipment_temperature_celsius": "Temperature of a piece of equipment, in degrees Celsius (simulated).",
    "demo_equipment_vibration_rms_mm_per_second": (
        "Root-mean-square vibration velocity of a piece of equipment, in millimetres per second (simulated)."
    ),
    "demo_equipment_current_amperes": "Motor current of a piece of equipment, in amperes (simulated).",
    "demo_equipment_speed_rpm": "Shaft speed of a piece of equipment, in revolutions per minute (simulated).",
    "demo_equipment_vibration_band_amplitude_mm_per_second": (
        "Vibration velocity amplitude in the band centred on frequency_hz, in millimetres per second (simulated)."
    ),
}

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


# --- daily shapes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowShape:
    """Daily shape that is 1 from ``start_hour`` to ``end_hour`` (UTC) and 0 elsewhere.

    The edges are logistic ramps ``ramp_hours`` wide. A window may cross midnight
    (``start_hour`` > ``end_hour``), as a nightly job does.
    """

    start_hour: float
    end_hour: float
    ramp_hours: float = 0.75

    def __post_init__(self) -> None:
        for name in ("start_hour", "end_hour"):
            value = getattr(self, name)
            if not 0 <= value < 24:
                raise ValueError(f"invalid {name} {value!r}: expected an hour from 0 to 24 (exclusive)")
        if self.ramp_hours <= 0:
            raise ValueError(f"invalid ramp_hours {self.ramp_hours!r}: expected a positive number")

    def __call__(self, hours: np.ndarray) -> np.ndarray:
        length = (self.end_hour - self.start_hour) % 24
        shape = np.zeros_like(hours, dtype=float)
        # The window repeats every 24 hours, so the copies from the previous and next day cover
        # the hours around midnight.
        for day in (-24.0, 0.0, 24.0):
            since_start = hours - (self.start_hour + day)
            rise = _logistic(since_start / self.ramp_hours)
            fall = _logistic((length - since_start) / self.ramp_hours)
            shape = np.maximum(shape, rise * fall)
        return shape


@dataclass(frozen=True)
class CosineShape:
    """Daily shape ``(1 + cos(2 pi (hour - peak_hour) / 24)) / 2``: 1 at the peak, 0 twelve hours later."""

    peak_hour: float

    def __call__(self, hours: np.ndarray) -> np.ndarray:
        return 0.5 * (1.0 + np.cos(2.0 * np.pi * (hours - self.peak_hour) / 24.0))


DailyShape = Union[WindowShape, CosineShape]


def _logistic(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# --- series and anomalies ----------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesSpec:
    """One simulated series: a metric name, the labels of its entity, and its behaviour over time."""

    metric: str
    labels: Mapping[str, str]
    level: float
    """Value at the quietest hour of a weekday, before noise, in the metric's unit."""
    daily_amplitude: float
    daily_shape: DailyShape
    noise: float
    """Standard deviation of the noise in the metric's unit, which is also the anomaly "noise unit"."""
    weekend_factor: float = 1.0
    """Multiplier of the daily amplitude on Saturday and Sunday (UTC): the weekly cycle."""
    minimum: float | None = 0.0
    maximum: float | None = None
    resolution: float | None = None
    """Step that values are rounded to after clipping, such as 1 for a count of pods. None keeps them exact."""

    def __post_init__(self) -> None:
        if not _METRIC_NAME.match(self.metric):
            raise ValueError(f"invalid metric name {self.metric!r}: expected [a-zA-Z_:][a-zA-Z0-9_:]*")
        for name in self.labels:
            if not _LABEL_NAME.match(name) or name.startswith("__"):
                raise ValueError(f"invalid label name {name!r} on {self.metric}")
            if name in RESERVED_LABELS:
                raise ValueError(
                    f"label {name!r} on {self.metric} is reserved: Prometheus sets job and instance when it scrapes"
                )
        if not self.noise > 0:
            raise ValueError(f"invalid noise {self.noise!r} for {self.metric}: expected a positive standard deviation")
        if self.resolution is not None and not self.resolution > 0:
            raise ValueError(f"invalid resolution {self.resolution!r} for {self.metric}: expected a positive step or None")
        object.__setattr__(self, "labels", dict(self.labels))

    @property
    def key(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """Identity of the series: its metric name and sorted labels."""
        return self.metric, tuple(sorted(self.labels.items()))


@dataclass(frozen=True)
class Anomaly:
    """A disturbance added to every series whose labels contain ``match`` (and of ``metric``, if set).

    ``kind`` is ``spike`` (upward), ``drop`` (downward) or ``level_shift`` (the sign of
    ``magnitude``). In ``unit="noise"`` the offset is ``magnitude`` times the series' noise
    standard deviation. In ``unit="relative"`` it is ``magnitude`` times the series' value without
    noise, so a drop of 1.0 brings the series to 0. The anomaly covers ``start <= t < start +
    duration`` (unix seconds), and one with a ``duration`` of None never ends.
    """

    match: Mapping[str, str]
    start: float
    duration: float | None
    kind: str = "spike"
    magnitude: float = 5.0
    unit: str = "noise"
    metric: str | None = None

    def __post_init__(self) -> None:
        if not self.match:
            raise ValueError("invalid anomaly: match is empty. Name the entity, for example {'host': 'h2'}")
        if self.kind not in ANOMALY_KINDS:
            raise ValueError(f"invalid anomaly kind {self.kind!r}: expected one of {', '.join(ANOMALY_KINDS)}")
        if self.unit not in MAGNITUDE_UNITS:
            raise ValueError(f"invalid anomaly unit {self.unit!r}: expected one of {', '.join(MAGNITUDE_UNITS)}")
        if not math.isfinite(self.magnitude):
            raise ValueError(f"invalid anomaly magnitude {self.magnitude!r}: expected a finite number")
        if self.kind != "level_shift" and self.magnitude < 0:
            raise ValueError(
                f"invalid magnitude {self.magnitude!r} for a {self.kind}: expected a non-negative size "
                "because the kind sets the direction. Use level_shift for a signed offset"
            )
        if self.duration is not None and not self.duration > 0:
            raise ValueError(f"invalid anomaly duration {self.duration!r}: expected positive seconds or None")
        object.__setattr__(self, "match", dict(self.match))

    @property
    def end(self) -> float:
        return math.inf if self.duration is None else self.start + self.duration

    def matches(self, spec: SeriesSpec) -> bool:
        if self.metric is not None and self.metric != spec.metric:
            return False
        return all(spec.labels.get(name) == value for name, value in self.match.items())

    def offsets(self, spec: SeriesSpec, timestamps: np.ndarray, expected: np.ndarray) -> np.ndarray:
        """Compute the offset this anomaly adds to ``spec`` at each timestamp (0 outside its interval)."""
        active = (timestamps >= self.start) & (timestamps < self.end)
        sign = {"spike": 1.0, "drop": -1.0, "level_shift": 1.0}[self.kind]
        if self.unit == "noise":
            size = np.full_like(expected, self.magnitude * spec.noise)
        else:
            size = self.magnitude * expected
        return np.where(active, sign * size, 0.0)


# --- the simulator -----------------------------------------------------------------------------


class Simulator:
    """Source of every simulated series' value at any timestamp, with injected anomalies included.

    Parameters
    ----------
    series
        The series to simulate. Defaults to ``default_series()``.
    anomalies
        Anomalies applied to history and live values alike. Each must match at least one series.
    seed
        Seed of the noise. The same seed, series and timestamps always give the same values.
    noise_interval
        Width in seconds of the buckets within which the noise stays constant.
    """

    def __init__(
        self,
        series: Sequence[SeriesSpec] | None = None,
        anomalies: Iterable[Anomaly] = (),
        *,
        seed: int = 0,
        noise_interval: float = 15.0,
    ) -> None:
        if not noise_interval > 0:
            raise ValueError(f"invalid noise_interval {noise_interval!r}: expected positive seconds")
        self.seed = int(seed)
        self.noise_interval = float(noise_interval)
        self._series = tuple(default_series() if series is None else series)
        _check_series(self._series)
        self._noise_keys = [_stable_key(self.seed, spec) for spec in self._series]
        self._lock = threading.Lock()
        self._anomalies: list[Anomaly] = []
        for anomaly in anomalies:
            self.add_anomaly(anomaly)

    @property
    def series(self) -> tuple[SeriesSpec, ...]:
        return self._series

    @property
    def anomalies(self) -> tuple[Anomaly, ...]:
        with self._lock:
            return tuple(self._anomalies)

    def metric_help(self) -> dict[str, str]:
        """Return the help text of each simulated metric name."""
        return {spec.metric: METRIC_HELP.get(spec.metric, f"Simulated series {spec.metric}.") for spec in self._series}

    def add_anomaly(self, anomaly: Anomaly) -> None:
        """Apply ``anomaly`` from now on to every later computation. Raises ValueError if it matches no series."""
        if not any(anomaly.matches(spec) for spec in self._series):
            raise ValueError(
                f"anomaly matches no series (match={dict(anomaly.match)}, metric={anomaly.metric}). "
                f"Known entity labels: {_entity_names(self._series)}"
            )
        with self._lock:
            self._anomalies.append(anomaly)

    def remove_anomaly(self, anomaly: Anomaly) -> None:
        """Remove one anomaly that was added before. Raises ValueError if it is not present."""
        with self._lock:
            self._anomalies.remove(anomaly)

    def expected(self, spec: SeriesSpec, timestamps: np.ndarray) -> np.ndarray:
        """Compute the series' value without noise or anomalies (its daily and weekly cycle)."""
        timestamps = np.asarray(timestamps, dtype=float)
        hours = np.mod(timestamps, SECONDS_PER_DAY) / 3600.0
        # 1970-01-01 was a Thursday, so with Monday as 0 the weekday is (days + 3) mod 7.
        weekdays = np.mod(np.floor(timestamps / SECONDS_PER_DAY) + 3, 7)
        day_factor = np.where(weekdays >= 5, spec.weekend_factor, 1.0)
        return spec.level + spec.daily_amplitude * spec.daily_shape(hours) * day_factor

    def values(self, spec: SeriesSpec, timestamps: np.ndarray) -> np.ndarray:
        """Compute the series' values at ``timestamps`` (unix seconds), noise and anomalies included."""
        timestamps = np.atleast_1d(np.asarray(timestamps, dtype=float))
        index = self._index_of(spec)
        expected = self.expected(spec, timestamps)
        buckets = np.floor(timestamps / self.noise_interval).astype(np.int64)
        values = expected + spec.noise * _standard_normal(self._noise_keys[index], buckets)
        for anomaly in self.anomalies:
            if anomaly.matches(spec):
                values = values + anomaly.offsets(spec, timestamps, expected)
        lower = -np.inf if spec.minimum is None else spec.minimum
        upper = np.inf if spec.maximum is None else spec.maximum
        values = np.clip(values, lower, upper)
        if spec.resolution is not None:
            values = np.round(values / spec.resolution) * spec.resolution
        return values

    def sample(self, timestamp: float) -> list[tuple[SeriesSpec, float]]:
        """Return every series with its value at one timestamp (what a scrape at that time shows)."""
        instant = np.array([float(timestamp)])
        return [(spec, float(self.values(spec, instant)[0])) for spec in self._series]

    def history(
        self,
        start: float,
        end: float,
        step: float,
        *,
        job: str,
        instance: str,
        metric_steps: Mapping[str, float] | None = None,
    ) -> Iterator[tuple[str, dict[str, str], np.ndarray, np.ndarray]]:
        """Yield ``(metric, labels, timestamps, values)`` per series on the grid ``start, start + step, ... <= end``.

        ``job`` and ``instance`` are added to the labels. Pass the values Prometheus gives the live
        endpoint (its scrape job name and the target's ``host:port``) so that history and scraped
        samples form one series. ``metric_steps`` maps metric names to a step of their own, for
        a detector that queries them at a shorter step than ``step``. A range query at a step
        shorter than the samples' spacing repeats each sample, and a detector would take the
        repeats for noise-free data.
        """
        steps = {**(metric_steps or {})}
        for value in [step, *steps.values()]:
            if not value > 0:
                raise ValueError(f"invalid step {value!r}: expected positive seconds")
        if end < start:
            raise ValueError(f"invalid range: end {end!r} is before start {start!r}")
        grids: dict[float, np.ndarray] = {}
        for spec in self._series:
            spec_step = float(steps.get(spec.metric, step))
            if spec_step not in grids:
                count = int(math.floor((end - start) / spec_step + 1e-9)) + 1
                grids[spec_step] = float(start) + spec_step * np.arange(count)
            timestamps = grids[spec_step]
            labels = {**spec.labels, "job": job, "instance": instance}
            yield spec.metric, labels, timestamps.copy(), self.values(spec, timestamps)

    def _index_of(self, spec: SeriesSpec) -> int:
        for index, known in enumerate(self._series):
            if known is spec or known.key == spec.key:
                return index
        raise ValueError(f"unknown series {spec.metric}{spec.labels}: it is not part of this simulator")


def _check_series(series: Sequence[SeriesSpec]) -> None:
    if not series:
        raise ValueError("invalid simulator: no series given")
    seen: set = set()
    label_names: dict[str, tuple[str, ...]] = {}
    for spec in series:
        if spec.key in seen:
            raise ValueError(f"duplicate series {spec.metric}{spec.labels}")
        seen.add(spec.key)
        names = tuple(sorted(spec.labels))
        # One metric family has one set of label names in the exposition.
        if label_names.setdefault(spec.metric, names) != names:
            raise ValueError(
                f"series of {spec.metric} use different label names: {label_names[spec.metric]} and {names}"
            )


def _entity_names(series: Sequence[SeriesSpec]) -> list[str]:
    names = {f"{name}={value}" for spec in series for name, value in spec.labels.items()}
    return sorted(names)


# --- deterministic noise -----------------------------------------------------------------------


def _stable_key(seed: int, spec: SeriesSpec) -> int:
    # Python's hash() of a str changes between processes, so a cryptographic hash gives the key.
    text = f"{seed}\x00{spec.metric}\x00" + "\x00".join(f"{k}={v}" for k, v in sorted(spec.labels.items()))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 output function on uint64 arrays (multiplications wrap modulo 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _standard_normal(key: int, buckets: np.ndarray) -> np.ndarray:
    """Draw one standard normal number per bucket index, always the same for the same key and index."""
    counters = np.atleast_1d(buckets).astype(np.int64).view(np.uint64)
    first = _mix64(counters ^ np.uint64(key))
    second = _mix64(first)
    # Box-Muller transform. The top 53 bits give a uniform double, and the half-step offset keeps
    # the first uniform above 0 so that its logarithm is finite.
    uniform_a = ((first >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    uniform_b = (second >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.sqrt(-2.0 * np.log(uniform_a)) * np.cos(2.0 * np.pi * uniform_b)


# --- the default scenario ----------------------------------------------------------------------

TENANT_CPU = "demo_tenant_cpu_cores"
TENANT_MEMORY = "demo_tenant_memory_bytes"
TENANT_RECEIVE = "demo_tenant_network_receive_bytes_per_second"
TENANT_TRANSMIT = "demo_tenant_network_transmit_bytes_per_second"
TENANT_REQUESTS = "demo_tenant_requests_per_second"
TENANT_LATENCY = "demo_tenant_request_latency_p95_seconds"
TENANT_PODS = "demo_tenant_pods"
NODE_CPU = "demo_node_cpu_utilisation_ratio"
NODE_MEMORY = "demo_node_memory_utilisation_ratio"
EQUIPMENT_CURRENT = "demo_equipment_current_amperes"
EQUIPMENT_SPEED = "demo_equipment_speed_rpm"
EQUIPMENT_BAND = "demo_equipment_vibration_band_amplitude_mm_per_second"

# Metrics that the demo's tenant detector queries.
TENANT_DETECTOR_METRICS = (
    TENANT_CPU, TENANT_MEMORY, TENANT_RECEIVE, TENANT_TRANSMIT, TENANT_REQUESTS, TENANT_LATENCY, TENANT_PODS,
    NODE_CPU, NODE_MEMORY,
)

# The label of a band amplitude series that contains the band's centre frequency in Hz.
FREQUENCY_LABEL = "frequency_hz"
# Centre frequencies of the vibration bands that every machine reports: 12.5 Hz to 100 Hz.
BAND_FREQUENCIES_HZ = tuple(12.5 * k for k in range(1, 9))
# Shaft speed of each machine in revolutions per minute.
SHAFT_SPEED_RPM = {"pump-1": 1480.0, "pump-2": 1480.0, "compressor-1": 2960.0}


@dataclass(frozen=True)
class _Tenant:
    family: str
    """``web`` (many short requests in busy hours) or ``batch`` (a nightly job, few requests)."""
    node: str
    shape: DailyShape
    size: float
    """Multiplier of the family's memory, network, request and pod levels and of their noise."""


# Three groups of tenants whose members share a daily cycle, so that each tenant has peers:
# business hours, an evening peak and a nightly batch job.
TENANTS = {
    "shop": _Tenant("web", "node-1", WindowShape(8, 19), 1.0),
    "checkout": _Tenant("web", "node-1", WindowShape(8, 19), 0.6),
    "billing": _Tenant("web", "node-2", WindowShape(9, 17), 0.5),
    "accounts": _Tenant("web", "node-2", WindowShape(9, 17), 0.4),
    "search": _Tenant("web", "node-2", CosineShape(20), 1.5),
    "video": _Tenant("web", "node-1", CosineShape(20), 1.0),
    "chat": _Tenant("web", "node-2", CosineShape(20), 0.8),
    "reports": _Tenant("batch", "node-1", WindowShape(2, 5), 1.0),
    "etl": _Tenant("batch", "node-1", WindowShape(2, 5), 1.5),
    "backup": _Tenant("batch", "node-2", WindowShape(2, 5), 0.8),
    "analytics": _Tenant("batch", "node-2", WindowShape(2, 5), 1.2),
}

# (level, daily amplitude, noise) of a tenant of size 1, per family and metric. Latency does not
# grow with the size.
_FAMILY_METRICS = {
    "web": {
        TENANT_MEMORY: (3 * GIB, 1 * GIB, 48 * MIB),
        TENANT_RECEIVE: (2e6, 6e6, 1.5e5),
        TENANT_TRANSMIT: (4e6, 1.2e7, 3e5),
        TENANT_REQUESTS: (40.0, 160.0, 3.0),
        TENANT_LATENCY: (0.08, 0.03, 0.004),
        TENANT_PODS: (2.0, 4.0, 0.3),
    },
    "batch": {
        TENANT_MEMORY: (1 * GIB, 4 * GIB, 64 * MIB),
        TENANT_RECEIVE: (1e5, 3e6, 1e4),
        TENANT_TRANSMIT: (5e4, 8e5, 5e3),
        TENANT_REQUESTS: (2.0, 4.0, 0.2),
        TENANT_LATENCY: (0.25, 0.2, 0.02),
        TENANT_PODS: (1.0, 3.0, 0.3),
    },
}

# The noisy-neighbour episode: where it happens and whom it involves.
NOISY_NODE = "node-1"
NOISY_TENANT = "etl"
AFFECTED_TENANTS = ("shop", "checkout")
# Noise of node-1's CPU utilisation, and how far the episode lifts it: from its usual range of
# 0.40 to 0.55 to at least 0.92, above the noisy-neighbour search's default stress ratio of 0.85.
NODE_CPU_NOISE = 0.02
NOISY_NODE_CPU_OFFSET = 0.52


def default_series() -> list[SeriesSpec]:
    """Build the default tenants, nodes, hosts and equipment described in the module docstring."""
    return _tenant_series() + _node_series() + _host_series() + _equipment_series()


def _tenant_series() -> list[SeriesSpec]:
    tenants = TENANTS
    series = [
        # CPU cores used by each namespace.
        SeriesSpec(TENANT_CPU, {"namespace": "shop"}, 2.0, 6.0, tenants["shop"].shape, 0.25),
        SeriesSpec(TENANT_CPU, {"namespace": "billing"}, 1.0, 1.5, tenants["billing"].shape, 0.1),
        SeriesSpec(TENANT_CPU, {"namespace": "search"}, 3.0, 4.0, tenants["search"].shape, 0.3),
        SeriesSpec(TENANT_CPU, {"namespace": "reports"}, 0.5, 5.0, tenants["reports"].shape, 0.15),
        SeriesSpec(TENANT_CPU, {"namespace": "checkout"}, 1.0, 3.0, tenants["checkout"].shape, 0.12),
        SeriesSpec(TENANT_CPU, {"namespace": "accounts"}, 0.6, 0.9, tenants["accounts"].shape, 0.06),
        SeriesSpec(TENANT_CPU, {"namespace": "video"}, 2.0, 2.7, tenants["video"].shape, 0.2),
        SeriesSpec(TENANT_CPU, {"namespace": "chat"}, 1.5, 2.0, tenants["chat"].shape, 0.15),
        SeriesSpec(TENANT_CPU, {"namespace": "etl"}, 0.4, 4.0, tenants["etl"].shape, 0.12),
        SeriesSpec(TENANT_CPU, {"namespace": "backup"}, 0.2, 2.0, tenants["backup"].shape, 0.06),
        SeriesSpec(TENANT_CPU, {"namespace": "analytics"}, 0.3, 3.0, tenants["analytics"].shape, 0.09),
    ]
    for namespace, tenant in tenants.items():
        for metric, (level, amplitude, noise) in _FAMILY_METRICS[tenant.family].items():
            scale = 1.0 if metric == TENANT_LATENCY else tenant.size
            labels = {"namespace": namespace}
            options = {}
            if metric == TENANT_PODS:
                labels["node"] = tenant.node
                options = {"minimum": 1.0, "resolution": 1.0}
            series.append(SeriesSpec(metric, labels, scale * level, scale * amplitude, tenant.shape, scale * noise, **options))
    return series


def _node_series() -> list[SeriesSpec]:
    # Each node follows its own daily cycle: it is not the sum of its tenants' usage.
    return [
        SeriesSpec(NODE_CPU, {"node": "node-1"}, 0.40, 0.15, WindowShape(8, 19), NODE_CPU_NOISE,
                   weekend_factor=0.5, maximum=1.0),
        SeriesSpec(NODE_MEMORY, {"node": "node-1"}, 0.55, 0.08, WindowShape(8, 19), 0.01,
                   weekend_factor=0.5, maximum=1.0),
        SeriesSpec(NODE_CPU, {"node": "node-2"}, 0.30, 0.20, CosineShape(20), NODE_CPU_NOISE, maximum=1.0),
        SeriesSpec(NODE_MEMORY, {"node": "node-2"}, 0.50, 0.10, CosineShape(20), 0.01, maximum=1.0),
    ]


def _host_series() -> list[SeriesSpec]:
    business = WindowShape(8, 19)
    return [
        # CPU as a ratio of the host's capacity and memory in bytes.
        SeriesSpec("demo_host_cpu_utilisation_ratio", {"host": "h1"}, 0.20, 0.35, business, 0.02, weekend_factor=0.5, maximum=1.0),
        SeriesSpec("demo_host_memory_used_bytes", {"host": "h1"}, 6 * GIB, 1.5 * GIB, business, 64 * MIB, weekend_factor=0.5),
        SeriesSpec("demo_host_cpu_utilisation_ratio", {"host": "h2"}, 0.30, 0.25, CosineShape(14), 0.02, maximum=1.0),
        SeriesSpec("demo_host_memory_used_bytes", {"host": "h2"}, 8 * GIB, 1.0 * GIB, CosineShape(14), 64 * MIB),
        SeriesSpec("demo_host_cpu_utilisation_ratio", {"host": "h3"}, 0.10, 0.65, WindowShape(1, 4), 0.015, maximum=1.0),
        SeriesSpec("demo_host_memory_used_bytes", {"host": "h3"}, 4 * GIB, 8.0 * GIB, WindowShape(1, 4), 96 * MIB),
        SeriesSpec("demo_host_cpu_utilisation_ratio", {"host": "h4"}, 0.25, 0.15, CosineShape(20), 0.02, maximum=1.0),
        SeriesSpec("demo_host_memory_used_bytes", {"host": "h4"}, 12 * GIB, 0.5 * GIB, CosineShape(20), 96 * MIB),
    ]


def _equipment_series() -> list[SeriesSpec]:
    # Nearly flat readings that follow the ambient temperature a little.
    series = [
        SeriesSpec("demo_equipment_temperature_celsius", {"equipment": "pump-1"}, 55.0, 1.5, CosineShape(15), 0.3, minimum=None),
        SeriesSpec("demo_equipment_vibration_rms_mm_per_second", {"equipment": "pump-1"}, 2.8, 0.1, CosineShape(15), 0.08),
        SeriesSpec("demo_equipment_temperature_celsius", {"equipment": "pump-2"}, 58.0, 1.5, CosineShape(15), 0.3, minimum=None),
        SeriesSpec("demo_equipment_vibration_rms_mm_per_second", {"equipment": "pump-2"}, 3.2, 0.1, CosineShape(15), 0.08),
        SeriesSpec("demo_equipment_temperature_celsius", {"equipment": "compressor-1"}, 71.0, 2.0, CosineShape(16), 0.4, minimum=None),
        SeriesSpec("demo_equipment_vibration_rms_mm_per_second", {"equipment": "compressor-1"}, 4.5, 0.2, CosineShape(16), 0.12),
    ]
    # (ambient peak hour, motor current level and noise in amperes, amplitude of the 1x band in mm/s)
    machines = {"pump-1": (15, 16.0, 0.15, 1.1), "pump-2": (15, 16.5, 0.15, 1.2), "compressor-1": (16, 38.0, 0.3, 1.6)}
    for name, (peak_hour, current, current_noise, one_x) in machines.items():
        labels = {"equipment": name}
        speed = SHAFT_SPEED_RPM[name]
        series.append(SeriesSpec(EQUIPMENT_CURRENT, labels, current, 0.04 * current, CosineShape(peak_hour), current_noise))
        series.append(SeriesSpec(EQUIPMENT_SPEED, labels, speed, 0.0, CosineShape(peak_hour), 0.002 * speed))
        # A healthy spectrum: a peak at the shaft frequency (1x), a smaller one at 2x and a low floor.
        peaks = {order_band(name, 1): one_x, order_band(name, 2): 0.3 * one_x}
        for frequency in BAND_FREQUENCIES_HZ:
            amplitude = peaks.get(frequency, 0.05)
            series.append(SeriesSpec(
                EQUIPMENT_BAND, {**labels, FREQUENCY_LABEL: f"{frequency:g}"}, amplitude, 0.0,
                CosineShape(peak_hour), 0.04 * amplitude,
            ))
    return series


def order_band(equipment: str, order: float) -> float:
    """Return the band centre in Hz nearest to ``order`` times the shaft frequency of ``equipment``."""
    shaft_hz = SHAFT_SPEED_RPM[equipment] / 60.0
    return min(BAND_FREQUENCIES_HZ, key=lambda frequency: abs(frequency - order * shaft_hz))


def imbalance(equipment: str, start: float, duration: float | None = None, *, magnitude: float = 2.0) -> Anomaly:
    """Build an imbalance of ``equipment``: its 1x band amplitude grows by ``magnitude`` times its usual value.

    The default magnitude triples the amplitude, which the equipment detector's fault signature
    ``imbalance`` scores far above 2.
    """
    match = {"equipment": equipment, FREQUENCY_LABEL: f"{order_band(equipment, 1):g}"}
    return Anomaly(match, start, duration, "level_shift", magnitude, unit="relative", metric=EQUIPMENT_BAND)


def noisy_neighbour_episode(start: float, duration: float | None = 1200.0) -> list[Anomaly]:
    """Build a noisy-neighbour incident on ``NOISY_NODE`` from ``start`` for ``duration`` seconds (None: no end).

    ``NOISY_TENANT`` uses 4 times its usual CPU and twice its usual memory, the node's CPU
    utilisation rises to 0.92 or more, and the two ``AFFECTED_TENANTS`` on the node serve half
    their usual requests with 2.5 times their usual latency. The offsets are relative to the
    value without noise, so the episode looks alike at any hour.
    """
    anomalies = [
        Anomaly({"namespace": NOISY_TENANT}, start, duration, "level_shift", 3.0, unit="relative", metric=TENANT_CPU),
        Anomaly({"namespace": NOISY_TENANT}, start, duration, "level_shift", 1.0, unit="relative", metric=TENANT_MEMORY),
        Anomaly({"node": NOISY_NODE}, start, duration, "level_shift", NOISY_NODE_CPU_OFFSET / NODE_CPU_NOISE, metric=NODE_CPU),
    ]
    for tenant in AFFECTED_TENANTS:
        anomalies.append(Anomaly(
            {"namespace": tenant}, start, duration, "level_shift", 1.5, unit="relative", metric=TENANT_LATENCY,
        ))
        anomalies.append(Anomaly({"namespace": tenant}, start, duration, "drop", 0.5, unit="relative", metric=TENANT_REQUESTS))
    return anomalies


def default_anomalies(reference_time: float, *, ongoing: bool = True) -> list[Anomaly]:
    """Build the default scenario's anomalies, placed relative to ``reference_time`` (usually the end of history).

    With ``ongoing``, ``pump-2`` gets an imbalance 45 minutes before ``reference_time`` that
    never ends: its 1x band amplitude triples and its vibration RMS shifts up, so its live values
    are anomalous too. The other anomalies end before it. The noisy-neighbour episode is not part
    of this list: ``noisy_neighbour_episode`` places it after the exporter's first fit.
    """
    hour = 3600.0
    # Put the failed nightly job of "reports" at 02:00 UTC on the day two days before the reference.
    reports_night = math.floor((reference_time - 2 * SECONDS_PER_DAY) / SECONDS_PER_DAY) * SECONDS_PER_DAY + 2 * hour
    anomalies = [
        Anomaly({"namespace": "search"}, reference_time - 50 * hour, 30 * 60, "spike", 8.0, metric=TENANT_CPU),
        Anomaly({"namespace": "reports"}, reports_night, 3 * hour, "drop", 0.9, unit="relative", metric=TENANT_CPU),
        Anomaly({"host": "h4"}, reference_time - 30 * hour, 8 * hour, "level_shift", 10.0, metric="demo_host_memory_used_bytes"),
        Anomaly(
            {"equipment": "compressor-1"}, reference_time - 20 * hour, 20 * 60, "spike", 12.0,
            metric="demo_equipment_temperature_celsius",
        ),
    ]
    if ongoing:
        fault_start = reference_time - 45 * 60
        anomalies.append(
            Anomaly(
                {"equipment": "pump-2"}, fault_start, None, "level_shift", 8.0,
                metric="demo_equipment_vibration_rms_mm_per_second",
            )
        )
        anomalies.append(imbalance("pump-2", fault_start))
    return anomalies


def default_simulator(reference_time: float, *, seed: int = 0, ongoing: bool = True) -> Simulator:
    """Build a simulator with the default series and the default anomalies around ``reference_time``."""
    return Simulator(default_series(), default_anomalies(reference_time, ongoing=ongoing), seed=seed)


# --- live /metrics endpoint --------------------------------------------------------------------


class _SimulatorCollector:
    """prometheus_client collector that computes every series at the time of the scrape."""

    def __init__(self, simulator: Simulator, clock: Callable[[], float]) -> None:
        self._simulator = simulator
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        help_texts = self._simulator.metric_help()
        families: dict[str, GaugeMetricFamily] = {}
        for spec, value in self._simulator.sample(self._clock()):
            family = families.get(spec.metric)
            if family is None:
                family = GaugeMetricFamily(spec.metric, help_texts[spec.metric], labels=sorted(spec.labels))
                families[spec.metric] = family
            family.add_metric([spec.labels[name] for name in sorted(spec.labels)], value)
        yield from families.values()


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        logger.debug("simulator HTTP %s: " + format, self.client_address[0], *args)


class LiveServer:
    """HTTP server on 127.0.0.1 that serves the simulator's current values at ``/metrics``.

    The server starts in the constructor and runs in a daemon thread until ``stop()``. ``port=0``
    picks a free port, which ``port`` then contains. ``clock`` returns the unix time a scrape is
    computed for: ``time.time`` by default, or a fixed time in tests. Anomalies added with ``inject`` go
    into the simulator, so a later ``history()`` call contains them too.
    """

    host = "127.0.0.1"

    def __init__(self, simulator: Simulator, port: int = 0, *, clock: Callable[[], float] = time.time) -> None:
        self.simulator = simulator
        self._clock = clock
        self._injected: list[Anomaly] = []
        self._injected_lock = threading.Lock()

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_SimulatorCollector(simulator, clock))
        metrics_app = make_wsgi_app(registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO") != "/metrics":
                start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
                return [b"not found: this server serves /metrics only\n"]
            return metrics_app(environ, start_response)

        self._server = make_server(self.host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
        self.port: int = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"simulator-{self.port}", daemon=True)
        self._thread.start()
        self._stopped = False
        logger.info("simulator serving %s (%d series)", self.url, len(simulator.series))

    @property
    def target(self) -> str:
        """The ``host:port`` to put in a scrape config, which Prometheus also uses as ``instance``."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.target}/metrics"

    def inject(
        self,
        match: Mapping[str, str],
        *,
        kind: str = "spike",
        magnitude: float = 10.0,
        duration: float | None = 600.0,
        unit: str = "noise",
        metric: str | None = None,
    ) -> Anomaly:
        """Start an anomaly now on the series that ``match`` (and ``metric``) select, and return it.

        For example ``inject({"host": "h2"}, metric="demo_host_cpu_utilisation_ratio")`` makes
        h2's CPU spike by 10 noise standard deviations for 10 minutes. Raises ValueError if the
        anomaly is invalid or matches no series.
        """
        anomaly = Anomaly(match, self._clock(), duration, kind, magnitude, unit, metric)
        self.simulator.add_anomaly(anomaly)
        with self._injected_lock:
            self._injected.append(anomaly)
        logger.info(
            "injected %s of %g %s into %s%s for %s s",
            kind, magnitude, unit, dict(match), f" ({metric})" if metric else "",
            "unlimited" if duration is None else f"{duration:g}",
        )
        return anomaly

    def clear(self) -> int:
        """Remove every anomaly added with ``inject`` and return how many there were.

        The simulator's own anomalies, passed to its constructor, stay.
        """
        with self._injected_lock:
            injected, self._injected = self._injected, []
        for anomaly in injected:
            self.simulator.remove_anomaly(anomaly)
        logger.info("cleared %d injected anomalies", len(injected))
        return len(injected)

    def stop(self) -> None:
        """Stop serving and wait for the server thread to end. Calling it twice does nothing."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        logger.info("simulator on %s stopped", self.target)

    def __enter__(self) -> "LiveServer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
