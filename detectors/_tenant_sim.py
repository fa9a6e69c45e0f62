"""Synthetic tenants on nodes with daily and weekly cycles and labelled anomalies, for tests and benchmarks.

Tenants belong to one of three behaviour families (web traffic in business hours, a nightly
batch job, an evening peak) and differ by a size factor. Every metric is

    size * (quiet level + amplitude * daily shape(hour of day, UTC) * weekly factor) * (1 + noise_ratio * z)

with independent standard normal z per sample. The weekly factor is 1 unless ``weekly`` is set,
and then follows ``WEEKLY_FACTORS`` (web traffic drops at weekends, for example). Latency is not
scaled by the size factor. ``simulate_tenants`` injects one anomaly of each kind into the last
day, plus a noisy neighbour on the last node and a joint moderate shift that only the
multivariate signal should see.

Node utilisation is the tenants' summed CPU or memory over the node's allocatable amount, which
is sized so that the noise-free peak of normal load is ``NODE_CPU_PEAK`` (CPU) or
``NODE_MEMORY_PEAK`` (memory) of it.
"""

from dataclasses import dataclass, field, replace

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

# Factor on the daily amplitude per day of the week, Monday first, applied when ``weekly`` is set.
# Web traffic drops at weekends, the batch job runs longer on Sunday nights (a weekly full run)
# and the evening peak grows from Friday to Sunday.
WEEKLY_FACTORS = {
    "web": (1.0, 1.0, 1.0, 1.0, 1.0, 0.35, 0.3),
    "batch": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.8),
    "evening": (1.0, 1.0, 1.0, 1.0, 1.15, 1.3, 1.2),
}
# Hours over which the weekly factor changes around midnight, so it changes smoothly, not in a step.
WEEKLY_RAMP_HOURS = 1.0

# Share of a node's allocatable CPU and memory that the noise-free peak of normal load uses.
NODE_CPU_PEAK = 0.65
NODE_MEMORY_PEAK = 0.7

# The noisy tenant adds this share of its node's allocatable CPU, or more where the node's
# other load is low (weekends), so that the node's noise-free CPU utilisation stays at or above
# NOISY_NODE_CPU through the incident.
NOISY_CPU_SHARE = 0.6
NOISY_NODE_CPU = 0.9

# Placement of the injected anomalies: role -> (family, node position, ordinal). The tenant is
# the ordinal-th (0-based) tenant of that family on nodes[position], counting in tenant order.
# Nodes 0, 1 and -1 must differ, so injection needs at least 3 nodes.
ANOMALY_PLACEMENT = {
    "resource_exhaustion": ("web", 0, 1),
    "cpu_spike": ("web", 1, 1),
    "degraded": ("web", 1, 2),
    "network_spike": ("batch", 1, 1),
    "disk_stop": ("batch", 1, 2),
    "noisy": ("web", -1, 1),
    "affected_0": ("web", -1, 2),
    "affected_1": ("web", -1, 3),
    "affected_2": ("web", -1, 4),
    "joint_shift": ("evening", -1, 3),
}
# Tenants per node that injection needs. The last node needs 5 web tenants, web tenants are the
# first third and nodes go to tenants in turn, so n_tenants >= 15 * n_nodes gives every role of
# ANOMALY_PLACEMENT a tenant (checked for 3 to 40 nodes and up to 180 tenants per node).
MIN_TENANTS_PER_NODE = 15


def node_names(n_nodes: int) -> tuple[str, ...]:
    """Return the node names ``n0``, ``n1``, ... of a simulation with ``n_nodes`` nodes."""
    return tuple(f"n{j}" for j in range(n_nodes))


def tenant_names(n_tenants: int) -> list[str]:
    """Return ``t00``, ``t01``, ... with 3 or more digits when there are over 100 tenants."""
    width = max(2, len(str(n_tenants - 1)))
    return [f"t{i:0{width}d}" for i in range(n_tenants)]


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


def weekly_factor(family: str, timestamps: np.ndarray) -> np.ndarray:
    """Return the family's ``WEEKLY_FACTORS`` entry at each Unix timestamp (UTC days).

    Around each midnight the factor moves from one day's value to the next over about
    ``WEEKLY_RAMP_HOURS``, reaching the midpoint at 00:00.
    """
    factors = np.asarray(WEEKLY_FACTORS[family])
    days = (np.asarray(timestamps, dtype=np.float64) - START) / DAY
    day = np.floor(days).astype(np.int64)
    hours = (days - day) * 24.0
    today = factors[day % 7]
    yesterday = factors[(day - 1) % 7]
    tomorrow = factors[(day + 1) % 7]
    from_yesterday = 0.5 * (1 - np.tanh(hours / WEEKLY_RAMP_HOURS))
    to_tomorrow = 0.5 * (1 + np.tanh((hours - 24.0) / WEEKLY_RAMP_HOURS))
    return today + (yesterday - today) * from_yesterday + (tomorrow - today) * to_tomorrow


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
    """A simulated panel: rows are (tenant, metric) series over ``timestamps``, tenant by tenant."""

    values: np.ndarray
    timestamps: np.ndarray
    row_tenants: list[str]
    row_metrics: list[str]
    family: dict[str, str]
    node: dict[str, str]
    node_cpu: dict[str, np.ndarray]
    """CPU utilisation per node, the tenants' summed CPU over ``cpu_allocatable``, clipped to 0..1."""
    node_memory: dict[str, np.ndarray]
    """Memory utilisation per node, the tenants' summed memory over ``memory_allocatable``, clipped to 0..1."""
    cpu_allocatable: dict[str, float]
    """Allocatable CPU per node, in cores."""
    memory_allocatable: dict[str, float]
    """Allocatable memory per node, in bytes."""
    anomalies: list[InjectedAnomaly] = field(default_factory=list)

    @property
    def tenants(self) -> list[str]:
        """Tenant names in row order."""
        return self.row_tenants[:: len(METRICS)]

    @property
    def nodes(self) -> list[str]:
        """Node names in order."""
        return list(self.cpu_allocatable)

    def metric_values(self, metric: str) -> np.ndarray:
        """Return the (tenants, time) values of one metric, tenants in ``tenants`` order (a view)."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}: expected one of {', '.join(METRICS)}")
        cube = self.values.reshape(len(self.tenants), len(METRICS), self.timestamps.size)
        return cube[:, METRICS.index(metric), :]

    def shifted(self, seconds: float) -> "TenantSimulation":
        """Return a copy whose timestamps and anomaly windows are ``seconds`` later, sharing ``values``."""
        anomalies = [replace(a, start=a.start + seconds, end=a.end + seconds) for a in self.anomalies]
        return replace(self, timestamps=self.timestamps + seconds, anomalies=anomalies)

    def truth(self, tenants, timestamps: np.ndarray, kinds=None) -> np.ndarray:
        """Return a (tenants, time) mask of injected anomalies, optionally of some kinds only."""
        index = {name: i for i, name in enumerate(tenants)}
        mask = np.zeros((len(tenants), timestamps.size), dtype=bool)
        for anomaly in self.anomalies:
            if kinds is None or anomaly.kind in kinds:
                mask[index[anomaly.tenant]] |= (timestamps >= anomaly.start) & (timestamps < anomaly.end)
        return mask


def simulate_tenants(
    n_tenants: int = 60,
    days: int = 7,
    *,
    n_nodes: int = 3,
    weekly: bool = False,
    seed: int = 0,
    noise_ratio: float = 0.03,
    inject: bool = True,
) -> TenantSimulation:
    """Simulate ``n_tenants`` tenants on ``n_nodes`` nodes for ``days`` days at 5 minutes from ``START``.

    Families go to tenants in blocks (the first third web, and so on) and nodes in turn. With
    ``weekly`` the daily amplitude follows ``WEEKLY_FACTORS``. With ``inject`` the last day
    carries the anomalies listed in the module docstring, which needs at least 3 nodes and
    ``MIN_TENANTS_PER_NODE * n_nodes`` tenants. Raises ValueError for fewer.
    """
    if n_tenants < 1 or days < 1 or n_nodes < 1:
        raise ValueError(f"n_tenants, days and n_nodes must be at least 1, got {n_tenants}, {days} and {n_nodes}")
    rng = np.random.default_rng(seed)
    timestamps = START + np.arange(0, days * DAY, STEP)
    hours = (timestamps % DAY) / 3600.0
    names = tenant_names(n_tenants)
    nodes = node_names(n_nodes)
    family = {name: FAMILIES[(i * len(FAMILIES)) // n_tenants] for i, name in enumerate(names)}
    node = {name: nodes[i % n_nodes] for i, name in enumerate(names)}
    roles = _place_anomalies(names, family, node, nodes) if inject else {}
    size = {name: float(rng.lognormal(0.0, 0.2)) for name in names}

    shapes = {}
    for name in FAMILIES:
        shapes[name] = daily_shape(name, hours)
        if weekly:
            shapes[name] = shapes[name] * weekly_factor(name, timestamps)
    base = np.empty((n_tenants, len(METRICS), timestamps.size))
    for i, name in enumerate(names):
        shape = shapes[family[name]]
        for m, metric in enumerate(METRICS):
            level, amplitude = FAMILY_LEVELS[family[name]][metric]
            scale = 1.0 if metric == "latency" else size[name]
            base[i, m] = scale * (level + amplitude * shape)
    noisy = base * (1 + noise_ratio * rng.standard_normal(base.shape))

    cpu = METRICS.index("cpu")
    memory = METRICS.index("memory")
    node_of_row = np.array([node[name] for name in names])
    normal_cpu = {n: base[node_of_row == n, cpu].sum(axis=0) for n in nodes}
    normal_memory = {n: base[node_of_row == n, memory].sum(axis=0) for n in nodes}
    cpu_allocatable = {n: float(normal_cpu[n].max() / NODE_CPU_PEAK) for n in nodes}
    memory_allocatable = {n: float(normal_memory[n].max() / NODE_MEMORY_PEAK) for n in nodes}

    anomalies: list[InjectedAnomaly] = []
    if inject:
        day_start = START + (days - 1) * DAY
        normal_utilisation = {n: normal_cpu[n] / cpu_allocatable[n] for n in nodes}
        anomalies = _inject(
            noisy, base, names, roles, node, day_start, timestamps, cpu_allocatable, normal_utilisation, noise_ratio
        )

    values = np.maximum(noisy, 0.0)
    node_cpu = {n: values[node_of_row == n, cpu].sum(axis=0) / cpu_allocatable[n] for n in nodes}
    node_memory = {n: values[node_of_row == n, memory].sum(axis=0) / memory_allocatable[n] for n in nodes}
    return TenantSimulation(
        values=values.reshape(-1, timestamps.size),
        timestamps=timestamps,
        row_tenants=[name for name in names for _ in METRICS],
        row_metrics=list(METRICS) * n_tenants,
        family=family,
        node=node,
        node_cpu={n: np.clip(series, 0.0, 1.0) for n, series in node_cpu.items()},
        node_memory={n: np.clip(series, 0.0, 1.0) for n, series in node_memory.items()},
        cpu_allocatable=cpu_allocatable,
        memory_allocatable=memory_allocatable,
        anomalies=anomalies,
    )


def _place_anomalies(names, family, node, nodes) -> dict[str, str]:
    """Return the tenant of every ``ANOMALY_PLACEMENT`` role, or raise ValueError when one has none."""
    if len(nodes) < 3:
        raise ValueError(f"injecting anomalies needs at least 3 nodes, got n_nodes={len(nodes)}: add nodes or pass inject=False")
    roles = {}
    for role, (family_name, position, ordinal) in ANOMALY_PLACEMENT.items():
        target = nodes[position]
        candidates = [name for name in names if family[name] == family_name and node[name] == target]
        if len(candidates) <= ordinal:
            raise ValueError(
                f"injecting anomalies needs at least {ordinal + 1} {family_name} tenants on node {target}, "
                f"found {len(candidates)}: use n_tenants >= {MIN_TENANTS_PER_NODE} * n_nodes "
                f"(got n_tenants={len(names)}, n_nodes={len(nodes)}) or inject=False"
            )
        roles[role] = candidates[ordinal]
    return roles


def _inject(
    values, base, names, roles, node, day_start, timestamps, allocatable, normal_utilisation, noise_ratio
) -> list[InjectedAnomaly]:
    """Apply the last day's anomalies to ``values`` in place and return their labels."""
    anomalies = []

    def window(start_hour: float, end_hour: float) -> tuple[float, float, np.ndarray]:
        start, end = day_start + start_hour * 3600, day_start + end_hour * 3600
        return start, end, (timestamps >= start) & (timestamps < end)

    def scale(tenant: str, metric: str, factor: float, active: np.ndarray) -> None:
        values[names.index(tenant), METRICS.index(metric), active] *= factor

    # Resource exhaustion: CPU and memory of a web tenant on the first node.
    tenant = roles["resource_exhaustion"]
    start, end, active = window(10, 12)
    scale(tenant, "cpu", 2.5, active)
    scale(tenant, "memory", 1.8, active)
    anomalies.append(InjectedAnomaly(tenant, "resource_exhaustion", start, end))

    # Network spike of a batch tenant on the second node in its quiet afternoon.
    tenant = roles["network_spike"]
    start, end, active = window(14, 15)
    scale(tenant, "network_in", 6.0, active)
    scale(tenant, "network_out", 5.0, active)
    anomalies.append(InjectedAnomaly(tenant, "network_spike", start, end))

    # A CPU spike and, overlapping it on the same (second) node, a behavioural change of another
    # tenant. That node stays below the stress ratio, so they must not pair up as noisy and affected.
    tenant = roles["cpu_spike"]
    start, end, active = window(9, 9.75)
    scale(tenant, "cpu", 3.0, active)
    anomalies.append(InjectedAnomaly(tenant, "cpu_spike", start, end))
    tenant = roles["degraded"]
    start, end, active = window(9.25, 10.5)
    scale(tenant, "request_rate", 0.4, active)
    scale(tenant, "latency", 1.8, active)
    anomalies.append(InjectedAnomaly(tenant, "behavioural", start, end))

    # Behavioural: a batch tenant's nightly job stops writing to disk.
    tenant = roles["disk_stop"]
    start, end, active = window(1.5, 3.5)
    scale(tenant, "disk_io", 0.2, active)
    anomalies.append(InjectedAnomaly(tenant, "behavioural", start, end))

    # Noisy neighbour on the last node: one web tenant takes NOISY_CPU_SHARE of the node's CPU
    # (more if needed to reach NOISY_NODE_CPU), and three web tenants there slow down.
    noisy = roles["noisy"]
    noisy_node = node[noisy]
    start, end, active = window(11, 13)
    share = max(NOISY_CPU_SHARE, NOISY_NODE_CPU - float(normal_utilisation[noisy_node][active].min()))
    values[names.index(noisy), METRICS.index("cpu"), active] += share * allocatable[noisy_node]
    anomalies.append(InjectedAnomaly(noisy, "cpu_spike", start, end, role="noisy"))
    start, end, active = window(11 + 1 / 6, 13)
    for victim in (roles["affected_0"], roles["affected_1"], roles["affected_2"]):
        scale(victim, "latency", 2.5, active)
        scale(victim, "request_rate", 0.55, active)
        anomalies.append(InjectedAnomaly(victim, "behavioural", start, end, role="affected"))

    # Joint moderate shift: every metric of an evening tenant 1.5 noise standard deviations up.
    tenant = roles["joint_shift"]
    start, end, active = window(16, 18)
    row = names.index(tenant)
    values[row][:, active] += 1.5 * noise_ratio * base[row][:, active]
    anomalies.append(InjectedAnomaly(tenant, "multivariate", start, end))
    return anomalies
