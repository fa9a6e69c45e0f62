"""Noisy-neighbour search on one node: whose high usage coincides with others' degradation.

While the node's CPU or memory utilisation is at or above ``stress_ratio``, a tenant is
*noisy* when its CPU, memory, network or disk usage is above its own baseline (signed
deviation of at least ``usage_threshold``) and another tenant on the node is degraded in most
of those samples. Degraded means latency above its baseline or request rate below it. Such a
degraded tenant is *affected* when it is not itself using more than usual, because a tenant
that degrades under its own load is no victim. All deviations are the signed band units of
``TenantScores.signed``.
"""

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# Metrics whose rise means a tenant uses more of the node.
USAGE_METRICS = ("cpu", "memory", "network_in", "network_out", "disk_io")


class NoisyNeighborParams(BaseModel):
    """Thresholds of the noisy-neighbour search."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stress_ratio: float = Field(default=0.85, gt=0, le=1)
    """Node CPU or memory utilisation (0..1) at which the node counts as stressed."""

    usage_threshold: float = Field(default=1.0, gt=0)
    """Signed deviation of a usage metric at which a tenant uses more than usual."""

    degradation_threshold: float = Field(default=1.0, gt=0)
    """Signed deviation of latency (up) or request rate (down) at which a tenant is degraded."""

    min_points: int = Field(default=3, ge=1)
    """Stressed samples a tenant must be high (noisy) or degraded (affected) in."""

    min_overlap: float = Field(default=0.5, gt=0, le=1)
    """Share of a noisy tenant's high stressed samples in which another tenant is degraded."""


@dataclass(frozen=True)
class NeighborFinding:
    """One tenant's role in a noisy-neighbour incident on a node."""

    node: str
    tenant: str
    role: Literal["noisy", "affected"]
    points: int
    """Stressed samples in which the tenant was high (noisy) or degraded while a noisy tenant was high (affected)."""


def _metric_rows(signed: np.ndarray, metrics: list[str], names: Sequence[str], sign: float) -> np.ndarray:
    """Return max over ``names`` of ``sign * signed`` per (tenant, time), -inf where none is present."""
    result = np.full((signed.shape[0], signed.shape[2]), -np.inf)
    for name in names:
        if name in metrics:
            values = sign * np.nan_to_num(signed[:, metrics.index(name), :], nan=-np.inf)
            result = np.maximum(result, values)
    return result


def find_noisy_neighbors(
    signed: np.ndarray,
    metrics: Sequence[str],
    tenants: Sequence[str],
    node_cpu: np.ndarray | None,
    node_memory: np.ndarray | None = None,
    *,
    node: str = "",
    params: NoisyNeighborParams = NoisyNeighborParams(),
) -> list[NeighborFinding]:
    """Find noisy and affected tenants among one node's tenants.

    Parameters
    ----------
    signed : ndarray (tenants, metrics, time)
        Signed deviations of the node's tenants, as in ``TenantScores.signed``.
    metrics, tenants : sequences of str
        Names of the metric and tenant axes.
    node_cpu, node_memory : ndarray (time,) or None
        Node utilisation as a ratio from 0 to 1; at least one is required.
    node : str
        Node name copied into the findings.

    Returns the findings sorted by role (noisy first) and tenant; empty when the node was never
    stressed or no coincidence was found.

    Examples
    --------
    >>> signed = np.zeros((3, 2, 6))
    >>> signed[0, 0, 2:] = 4.0              # tenant a: CPU far above its baseline
    >>> signed[1, 1, 2:] = 3.0              # tenant b: latency up at the same time
    >>> stressed = np.array([0.5, 0.5, 0.95, 0.95, 0.95, 0.95])
    >>> found = find_noisy_neighbors(signed, ["cpu", "latency"], ["a", "b", "c"], stressed, node="n1")
    >>> [(f.tenant, f.role) for f in found]
    [('a', 'noisy'), ('b', 'affected')]
    """
    signed = np.asarray(signed, dtype=np.float64)
    metrics = list(metrics)
    tenants = list(tenants)
    if signed.ndim != 3 or signed.shape[:2] != (len(tenants), len(metrics)):
        raise ValueError(f"signed must be ({len(tenants)} tenants, {len(metrics)} metrics, time), got {signed.shape}")
    if node_cpu is None and node_memory is None:
        raise ValueError("node_cpu and node_memory are both missing: pass at least one utilisation series")
    width = signed.shape[2]
    stressed = np.zeros(width, dtype=bool)
    for series in (node_cpu, node_memory):
        if series is None:
            continue
        series = np.asarray(series, dtype=np.float64)
        if series.shape != (width,):
            raise ValueError(f"node utilisation must have one value per column ({width}), got shape {series.shape}")
        with np.errstate(invalid="ignore"):
            stressed |= series >= params.stress_ratio
    if not stressed.any() or not tenants:
        return []

    usage = _metric_rows(signed, metrics, USAGE_METRICS, 1.0)[:, stressed]
    latency_up = _metric_rows(signed, metrics, ("latency",), 1.0)
    throughput_down = _metric_rows(signed, metrics, ("request_rate",), -1.0)
    degradation = np.maximum(latency_up, throughput_down)[:, stressed]

    high = usage >= params.usage_threshold
    degraded = (degradation >= params.degradation_threshold) & ~high

    # For each tenant and sample: is some *other* tenant degraded?
    degraded_count = degraded.sum(axis=0)
    others_degraded = (degraded_count[None, :] - degraded) > 0
    high_points = high.sum(axis=1)
    coinciding = (high & others_degraded).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        overlap = np.where(high_points > 0, coinciding / high_points, 0.0)
    noisy = (coinciding >= params.min_points) & (overlap >= params.min_overlap)
    if not noisy.any():
        return []

    noisy_high = np.any(high[noisy], axis=0)
    affected_points = (degraded & noisy_high[None, :]).sum(axis=1)
    affected = (affected_points >= params.min_points) & ~noisy

    findings = [NeighborFinding(node, tenants[i], "noisy", int(coinciding[i])) for i in np.flatnonzero(noisy)]
    findings += [NeighborFinding(node, tenants[i], "affected", int(affected_points[i])) for i in np.flatnonzero(affected)]
    return sorted(findings, key=lambda finding: (finding.role != "noisy", finding.tenant))


def noisy_neighbors_by_node(
    signed: np.ndarray,
    metrics: Sequence[str],
    tenants: Sequence[str],
    tenant_node: Mapping[str, str],
    node_cpu: Mapping[str, np.ndarray],
    node_memory: Mapping[str, np.ndarray] | None = None,
    *,
    params: NoisyNeighborParams = NoisyNeighborParams(),
) -> list[NeighborFinding]:
    """Run ``find_noisy_neighbors`` on every node, splitting tenants by ``tenant_node``.

    Tenants without a node are skipped. A tenant that runs on several nodes needs one entry
    per (tenant, node) pair in the input, under distinct tenant names.
    """
    node_memory = node_memory or {}
    tenants = list(tenants)
    findings: list[NeighborFinding] = []
    for node in sorted(set(tenant_node[name] for name in tenants if name in tenant_node)):
        rows = [i for i, name in enumerate(tenants) if tenant_node.get(name) == node]
        findings += find_noisy_neighbors(
            signed[rows],
            metrics,
            [tenants[i] for i in rows],
            node_cpu.get(node),
            node_memory.get(node),
            node=node,
            params=params,
        )
    return findings
