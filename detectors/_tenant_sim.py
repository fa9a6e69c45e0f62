"""Synthetic tenants on nodes with daily cycles and labelled anomalies, for the tenant detector's tests.

Tenants belong to one of three behaviour families (web traffic in business hours, a nightly
batch job, an evening peak) and differ by a size factor. Every metric is

    size * (quiet level + amplitude * daily shape(hour of day, UTC)) * (1 + noise_ratio * z)

with independent standard normal z per sample. ``simulate_tenants`` injects one anomaly of
each kind into the last day, plus a noisy neighbour on node ``n2`` and a joint moderate shift
that only the multivariate signal should see.
"""

from dataclasses import dataclass, field

import numpy as np

from detectors.tenant import METRICS

DAY = 86400.0
STEP = 300.0
# A Monday 00:00 UTC.
START = 1_767_571_200.0
FAMILIES = ("web", "batch", "evening")
NODES = ("n0", "n1", "n2")

# (quiet level, daily amplitude) per family and metric, in cores, bytes, bytes/s, requests/s and seconds.
FAMILY_LEVELS = {
    "web": {
        "cpu": (1.0, 2.0), "memory": (4e9, 1e9), "network_in": (2e6, 6e6), "network_out": (4e6, 1e7),
        "disk_io": (1e5, 1e5), "request_rate": (40.0, 160.0), "latency": (0.08, 0.04),
    },
    "batch": {
        "cpu": (0.5, 6.0), "memory": (2e9, 6e9), "network_in": (1e5, 2e6), "network_out": (1e5, 5e5),
        "disk_io": (2e5, 4e6), "request_rate": (2.0, 3.0), "latency": (0.3, 0.2),
    },
    "evening": {
        "cpu": (0.8, 1.5), "memory": (3e9, 5e8), "network_in": (5e6, 2e7), "network_out": (1e7, 4e7),
        "disk_io": (5e4, 5e4), "request_rate": (80.0, 300.0), "latency": (0.05, 0.02),
    },
}


def _window(hours: np.ndarray, start: float, end: float, ramp: float = 0.75) -> np.ndarray:
    """Smooth 0-to-1 window from ``start`` to ``end`` o'clock, crossing midnight when start > end."""
    length = (end - start) % 24
    shape = np.zeros_like(hours)
    for day in (-24.0, 0.0, 24.0):
        since = hours - start - day
        shape = np.maximum(shape, 0.25 * (1 + np.tanh(since / ramp)) * (1 + np.tanh((length - since) / ramp)))
    return shape


def daily_shape(family: str, hours: np.ndarray) -> np.ndarray:
    if family == "web":
        return _window(hours, 8, 19)
    if family == "batch":
        return _window(hours, 1, 5)
    return 0.5 * (1 + np.cos(2 * np.pi * (hours - 20) / 24))


@dataclass(frozen=True)
class InjectedAnomaly:
    """One labelled disturbance: ``kind`` is an ANOMALY_TYPES name or ``multivariate``."""

    tenant: str
    kind: str
    start: float
    end: float
    role: str = ""
    """``noisy`` or ``affected`` for the noisy-neighbour incident, else empty."""


@dataclass
class TenantSimulation:
    """A simulated panel: rows are (tenant, metric) series over ``timestamps``."""

    values: np.ndarray
    timestamps: np.ndarray
    row_tenants: list[str]
    row_metrics: list[str]
    family: dict[str, str]
    node: dict[str, str]
    node_cpu: dict[str, np.ndarray]
    anomalies: list[InjectedAnomaly] = field(default_factory=list)

    def truth(self, tenants, timestamps: np.ndarray, kinds=None) -> np.ndarray:
        """Return a (tenants, time) mask of injected anomalies, optionally of some kinds only."""
        index = {name: i for i, name in enumerate(tenants)}
        mask = np.zeros((len(tenants), timestamps.size), dtype=bool)
        for anomaly in self.anomalies:
            if kinds is None or anomaly.kind in kinds:
                mask[index[anomaly.tenant]] |= (timestamps >= anomaly.start) & (timestamps < anomaly.end)
        return mask


def simulate_tenants(
    n_tenants: int = 60, days: int = 7, *, seed: int = 0, noise_ratio: float = 0.03, inject: bool = True
) -> TenantSimulation:
    """Simulate ``n_tenants`` tenants (families and nodes in turn) for ``days`` days at 5 minutes.

    With ``inject`` the last day carries the anomalies listed in the module docstring; the
    tenant numbers they use need ``n_tenants`` of at least 51.
    """
    rng = np.random.default_rng(seed)
    timestamps = START + np.arange(0, days * DAY, STEP)
    hours = (timestamps % DAY) / 3600.0
    names = [f"t{i:02d}" for i in range(n_tenants)]
    family = {name: FAMILIES[(i * len(FAMILIES)) // n_tenants] for i, name in enumerate(names)}
    node = {name: NODES[i % len(NODES)] for i, name in enumerate(names)}
    size = {name: float(rng.lognormal(0.0, 0.2)) for name in names}

    base = np.empty((n_tenants, len(METRICS), timestamps.size))
    for i, name in enumerate(names):
        shape = daily_shape(family[name], hours)
        for m, metric in enumerate(METRICS):
            level, amplitude = FAMILY_LEVELS[family[name]][metric]
            scale = 1.0 if metric == "latency" else size[name]
            base[i, m] = scale * (level + amplitude * shape)
    noisy = base * (1 + noise_ratio * rng.standard_normal(base.shape))

    cpu = METRICS.index("cpu")
    node_names = np.array([node[name] for name in names])
    normal_cpu = {n: base[node_names == n, cpu].sum(axis=0) for n in NODES}
    capacity = {n: normal_cpu[n].max() / 0.65 for n in NODES}

    anomalies: list[InjectedAnomaly] = []
    if inject:
        day_start = START + (days - 1) * DAY
        anomalies = _inject(noisy, base, names, day_start, timestamps, capacity, noise_ratio)

    values = np.maximum(noisy, 0.0)
    node_cpu = {n: values[node_names == n, cpu].sum(axis=0) / capacity[n] for n in NODES}
    return TenantSimulation(
        values=values.reshape(-1, timestamps.size),
        timestamps=timestamps,
        row_tenants=[name for name in names for _ in METRICS],
        row_metrics=list(METRICS) * n_tenants,
        family=family,
        node=node,
        node_cpu={n: np.clip(series, 0.0, 1.0) for n, series in node_cpu.items()},
        anomalies=anomalies,
    )


def _inject(values, base, names, day_start, timestamps, capacity, noise_ratio) -> list[InjectedAnomaly]:
    """Apply the last day's anomalies to ``values`` in place and return their labels."""
    anomalies = []

    def window(start_hour: float, end_hour: float) -> tuple[float, float, np.ndarray]:
        start, end = day_start + start_hour * 3600, day_start + end_hour * 3600
        return start, end, (timestamps >= start) & (timestamps < end)

    def scale(tenant: str, metric: str, factor: float, active: np.ndarray) -> None:
        values[names.index(tenant), METRICS.index(metric), active] *= factor

    # Resource exhaustion: CPU and memory of a web tenant on n0.
    start, end, active = window(10, 12)
    scale("t03", "cpu", 2.5, active)
    scale("t03", "memory", 1.8, active)
    anomalies.append(InjectedAnomaly("t03", "resource_exhaustion", start, end))

    # Network spike of a batch tenant on n1 in its quiet afternoon.
    start, end, active = window(14, 15)
    scale("t25", "network_in", 6.0, active)
    scale("t25", "network_out", 5.0, active)
    anomalies.append(InjectedAnomaly("t25", "network_spike", start, end))

    # A CPU spike and, overlapping it on the same node n1, a behavioural change of another tenant.
    # Node n1 stays below the stress ratio, so they must not pair up as noisy and affected.
    start, end, active = window(9, 9.75)
    scale("t04", "cpu", 3.0, active)
    anomalies.append(InjectedAnomaly("t04", "cpu_spike", start, end))
    start, end, active = window(9.25, 10.5)
    scale("t07", "request_rate", 0.4, active)
    scale("t07", "latency", 1.8, active)
    anomalies.append(InjectedAnomaly("t07", "behavioural", start, end))

    # Behavioural: a batch tenant's nightly job stops writing to disk.
    start, end, active = window(1.5, 3.5)
    scale("t28", "disk_io", 0.2, active)
    anomalies.append(InjectedAnomaly("t28", "behavioural", start, end))

    # Noisy neighbour on n2: t05 takes 60 % of the node's CPU; three web tenants there slow down.
    start, end, active = window(11, 13)
    values[names.index("t05"), METRICS.index("cpu"), active] += 0.6 * capacity["n2"]
    anomalies.append(InjectedAnomaly("t05", "cpu_spike", start, end, role="noisy"))
    start, end, active = window(11 + 1 / 6, 13)
    for victim in ("t08", "t11", "t14"):
        scale(victim, "latency", 2.5, active)
        scale(victim, "request_rate", 0.55, active)
        anomalies.append(InjectedAnomaly(victim, "behavioural", start, end, role="affected"))

    # Joint moderate shift: every metric of an evening tenant 1.5 noise standard deviations up.
    start, end, active = window(16, 18)
    row = names.index("t50")
    values[row][:, active] += 1.5 * noise_ratio * base[row][:, active]
    anomalies.append(InjectedAnomaly("t50", "multivariate", start, end))
    return anomalies
