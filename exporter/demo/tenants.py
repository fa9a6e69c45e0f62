"""Kubernetes metrics for a tenant simulation, to backfill into Prometheus.

``tenant_series`` turns a ``detectors._tenant_sim.TenantSimulation`` into ``stack.Series``
under the metric names of the kubelet's cAdvisor, kube-state-metrics and an HTTP server
histogram, so that examples/presets/kubernetes-tenants.yaml reads it like a real cluster:

- Every tenant is a namespace named after it with one pod ``<tenant>-0`` on its node.
- Container metrics carry namespace, pod, container and node. CPU, memory and disk series exist
  twice, for the container ``app`` and for the pod's cgroup without a container label (as the
  kubelet's cAdvisor reports them), so a query that does not filter ``container!=""`` counts
  double. Network series belong to the pod's sandbox, ``container="POD"``, with ``interface``.
- ``http_server_request_duration_seconds_sum`` and ``_count`` (namespace, pod) carry request
  rate and mean latency. They have no ``_bucket`` series.
- ``kube_pod_info`` places each pod on its node, and ``kube_node_status_allocatable`` gives
  each node's allocatable CPU (cores) and memory (bytes).

Counters add ``rate * STEP`` per sample and start one step before the simulation with a
non-zero value, so ``rate(x[10m])`` returns the simulated rate from the first sample on, as long
as the query time falls between two samples (see ``end_between_steps``).

Typical use::

    simulation = shift_to_end(simulate_tenants(200, 14, n_nodes=5, weekly=True), end_between_steps(time.time()))
    backfill_series(tenant_series(simulation), data_dir)
"""

import math
from collections.abc import Iterator

import numpy as np

from detectors._tenant_sim import DAY, STEP, TenantSimulation
from exporter.demo.stack import Series

CONTAINER = "app"
SANDBOX_CONTAINER = "POD"
INTERFACE = "eth0"
DEVICE = "/dev/sda"
HTTP_DURATION = "http_server_request_duration_seconds"

# Share of reads in a family's disk throughput. The rest is writes.
DISK_READ_SHARE = {"web": 0.7, "batch": 0.25, "evening": 0.5}


def end_between_steps(now: float, step: float = STEP) -> float:
    """Return the time, half a step before the last multiple of ``step`` up to ``now``, for the last sample.

    The exporter queries at multiples of its step. Prometheus 2.x range selectors (checked on
    2.42) include both ends, so at a query time equal to a sample time the window of ``rate(x[10m])`` over 5-minute
    samples contains three samples, and the result is the mean of two intervals. Halfway between
    samples it contains two, so the result is the simulated rate, and a gauge returns the sample
    half a step before.
    """
    return math.floor(now / step) * step - step / 2


def shift_to_end(simulation: TenantSimulation, end: float) -> TenantSimulation:
    """Return a copy of ``simulation`` moved in time so that its last sample is at ``end``.

    Anomaly windows move with the samples, so ``truth`` keeps working. The daily and weekly
    cycles move too: after a shift that is not a whole number of weeks, "9 o'clock on Monday"
    of the simulation falls at another clock time.
    """
    return simulation.shifted(end - float(simulation.timestamps[-1]))


def _counters(rates: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """Integrate (series, time) rates per second into counters with one extra sample in front."""
    counters = np.empty((rates.shape[0], rates.shape[1] + 1))
    counters[:, 0] = initial
    counters[:, 1:] = initial[:, None] + np.cumsum(rates * STEP, axis=1)
    return counters


def _initial_values(rates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return counter start values of 1 to 30 days at each series' mean rate.

    A counter that starts near 0 makes ``rate`` stop extrapolating at the first samples
    (Prometheus assumes the counter started inside the window), which would bias them low.
    """
    return rates.mean(axis=1) * DAY * rng.uniform(1.0, 30.0, size=rates.shape[0])


def tenant_series(simulation: TenantSimulation, *, seed: int = 0) -> Iterator[Series]:
    """Yield the simulation as Kubernetes series, one metric name after the other.

    ``seed`` sets the counters' start values. There are 13 series per tenant and 2 per node,
    each as long as the simulation (one sample longer for counters).
    """
    rng = np.random.default_rng(seed)
    tenants = simulation.tenants
    timestamps = simulation.timestamps
    counter_timestamps = np.concatenate([[timestamps[0] - STEP], timestamps])
    pods = {tenant: f"{tenant}-0" for tenant in tenants}

    def container_labels(tenant: str, container: str | None, **extra: str) -> dict[str, str]:
        labels = {"namespace": tenant, "pod": pods[tenant], "node": simulation.node[tenant], **extra}
        if container is not None:
            labels["container"] = container
        return labels

    def container_counters(name: str, rates: np.ndarray, **extra: str) -> Iterator[Series]:
        counters = _counters(rates, _initial_values(rates, rng))
        for container in (CONTAINER, None):
            for i, tenant in enumerate(tenants):
                yield Series(name, container_labels(tenant, container, **extra), counter_timestamps, counters[i])

    yield from container_counters("container_cpu_usage_seconds_total", simulation.metric_values("cpu"))

    memory = simulation.metric_values("memory")
    for container in (CONTAINER, None):
        for i, tenant in enumerate(tenants):
            yield Series("container_memory_working_set_bytes", container_labels(tenant, container), timestamps, memory[i])

    for name, metric in (
        ("container_network_receive_bytes_total", "network_in"),
        ("container_network_transmit_bytes_total", "network_out"),
    ):
        rates = simulation.metric_values(metric)
        counters = _counters(rates, _initial_values(rates, rng))
        for i, tenant in enumerate(tenants):
            labels = container_labels(tenant, SANDBOX_CONTAINER, interface=INTERFACE)
            yield Series(name, labels, counter_timestamps, counters[i])

    disk = simulation.metric_values("disk_io")
    read_share = np.array([DISK_READ_SHARE[simulation.family[tenant]] for tenant in tenants])[:, None]
    yield from container_counters("container_fs_reads_bytes_total", disk * read_share, device=DEVICE)
    yield from container_counters("container_fs_writes_bytes_total", disk * (1 - read_share), device=DEVICE)

    requests = simulation.metric_values("request_rate")
    latency = simulation.metric_values("latency")
    for suffix, rates in (("count", requests), ("sum", requests * latency)):
        counters = _counters(rates, _initial_values(rates, rng))
        for i, tenant in enumerate(tenants):
            labels = {"namespace": tenant, "pod": pods[tenant]}
            yield Series(f"{HTTP_DURATION}_{suffix}", labels, counter_timestamps, counters[i])

    ones = np.ones(timestamps.size)
    for tenant in tenants:
        labels = {"namespace": tenant, "pod": pods[tenant], "node": simulation.node[tenant]}
        yield Series("kube_pod_info", labels, timestamps, ones)

    for node in simulation.nodes:
        for resource, unit, amount in (
            ("cpu", "core", simulation.cpu_allocatable[node]),
            ("memory", "byte", simulation.memory_allocatable[node]),
        ):
            labels = {"node": node, "resource": resource, "unit": unit}
            yield Series("kube_node_status_allocatable", labels, timestamps, np.full(timestamps.size, amount))
