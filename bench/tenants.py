"""Tenant benchmark: the kubernetes-tenants preset on the tenant simulator in a real Prometheus.

Run from the repository root: ``python -m bench.tenants`` (200 tenants on 5 nodes, 15 days,
daily and weekly cycles; about 5 minutes on 2 cores). Writes the ``tenants`` section of
docs/benchmarks.md. tests/test_tenant_end_to_end.py runs ``evaluate`` on a smaller fleet.

The simulation (detectors/_tenant_sim.py) is written as cAdvisor, kube-state-metrics and HTTP
histogram series (exporter/demo/tenants.py), backfilled with promtool, and read by the
preset's queries unchanged, except for ``fit_window``, which is set to the days before the
last one. A MultiQueryJob fits once at the start of the last day and then scores through it
with a fake clock, so the run takes minutes, not a day. After every score run the exposed
results are read from the collector, as a scrape would.

Scoring rules, fixed before the run:

* A tenant is flagged at a check when its ``anomaly_score`` is at least 1 (the warning edge).
* An injected anomaly is found when its tenant is flagged at some check from its start to
  ``GRACE_SECONDS`` after its end. Recall is per anomaly, pooled and per kind.
* Precision is over flagged (tenant, check) pairs: a pair counts as true when it lies inside
  an injected anomaly of that tenant or within ``GRACE_SECONDS`` after one (the rolling
  median and the band need a few samples to settle), else as a false alarm.
* The type of a found anomaly is the ``anomaly_type`` shown at most of its flagged checks.
  Affected tenants of the noisy neighbour count as ``behavioural``, the noisy one as ``cpu_spike``.
* The ``multivariate`` anomaly (a joint shift of 1.5 noise standard deviations on every metric)
  is reported apart: it is found when ``anomaly_multivariate_score`` or ``anomaly_score``
  reaches 1, and it is not part of the pooled recall.
"""

import argparse
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from prometheus_client import CollectorRegistry
from sklearn.metrics import adjusted_rand_score

from bench.report import environment_line, write_section
from detectors._tenant_sim import DAY, STEP, TenantSimulation, simulate_tenants
from exporter.config import DetectorConfig, SourceConfig
from exporter.demo.stack import PrometheusProcess, backfill_series
from exporter.demo.tenants import tenant_series
from exporter.job import MultiQueryJob
from exporter.metrics import AnomalyCollector, SelfMetrics
from exporter.source import PrometheusSource
from exporter.store import StateStore

PRESET = Path(__file__).resolve().parent.parent / "examples" / "presets" / "kubernetes-tenants.yaml"

# Seconds after an injected anomaly's end in which a flag still counts as a true one.
GRACE_SECONDS = 30 * 60

# The kind the tenant detector should name for each injected kind.
EXPECTED_TYPE = {"resource_exhaustion": "resource_exhaustion", "network_spike": "network_spike",
                 "cpu_spike": "cpu_spike", "behavioural": "behavioural"}


class FakeClock:
    """A clock the benchmark moves; ``at(t)`` puts the job's newest query time at grid time ``t``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def at(self, grid_time: float, query_delay: float) -> None:
        self.now = grid_time + query_delay + 15


@dataclass
class Evaluation:
    """Results of one run of ``evaluate``."""

    tenants: int
    nodes: int
    days: int
    checks: int
    fit_seconds: float
    score_seconds: list[float]
    found: dict[str, list[bool]] = field(default_factory=dict)
    """Per injected kind, whether each anomaly of that kind was found."""
    typed_right: dict[str, list[bool]] = field(default_factory=dict)
    true_flags: int = 0
    false_flags: int = 0
    false_alarm_tenants: set[str] = field(default_factory=set)
    flags_by_type: dict[str, list[int]] = field(default_factory=dict)
    """Per type named by ``anomaly_type``: [true flags, false flags]."""
    noisy_found: set[tuple[str, str, str]] = field(default_factory=set)
    noisy_truth: set[tuple[str, str, str]] = field(default_factory=set)
    adjusted_rand: float = float("nan")
    groups: int = 0

    @property
    def recall(self) -> float:
        hits = [hit for kind, values in self.found.items() if kind != "multivariate" for hit in values]
        return float(np.mean(hits)) if hits else float("nan")

    @property
    def precision(self) -> float:
        flagged = self.true_flags + self.false_flags
        return self.true_flags / flagged if flagged else float("nan")


def preset_detector(fit_window: str) -> dict:
    """Return the preset's tenant detector with another fit window."""
    detector = yaml.safe_load(PRESET.read_text(encoding="utf-8"))["detectors"][0]
    detector["fit_window"] = fit_window
    return detector


def load(simulation: TenantSimulation, folder: Path) -> PrometheusProcess:
    """Backfill the simulation into a TSDB under ``folder`` and start Prometheus on it."""
    backfill_series(tenant_series(simulation), folder / "tsdb")
    return PrometheusProcess(folder / "tsdb").start()


def simulation_for(n_tenants: int, n_nodes: int, days: int, seed: int = 0) -> TenantSimulation:
    """Simulate with weekly cycles, samples half a step before the exporter's query grid."""
    simulation = simulate_tenants(n_tenants, days, n_nodes=n_nodes, weekly=True, seed=seed)
    return simulation.shifted(-STEP / 2)


def evaluate(simulation: TenantSimulation, url: str, *, check_every: int = 1, hours: float = 24.0) -> Evaluation:
    """Fit the preset at the start of the simulation's last day and score ``hours`` of it."""
    days = int(round((simulation.timestamps[-1] - simulation.timestamps[0] + STEP) / DAY))
    config = DetectorConfig.model_validate(preset_detector(f"{days - 1}d"))
    source = PrometheusSource(SourceConfig(url=url, max_retries=1, timeout="60s"))
    clock = FakeClock()
    job = MultiQueryJob(config, source, StateStore(None), SelfMetrics(CollectorRegistry()), clock=clock)
    collector = AnomalyCollector(lambda: [job], clock=clock)
    delay = source.config.query_delay
    # Grid times of the exporter: samples sit half a step before them.
    day_start = simulation.timestamps[0] + STEP / 2 + (days - 1) * DAY
    result = Evaluation(len(simulation.tenants), len(simulation.nodes), days, 0, 0.0, [])
    try:
        clock.at(day_start, delay)
        started = time.perf_counter()
        job.fit()
        result.fit_seconds = time.perf_counter() - started
        if job._model is None:
            raise RuntimeError("the fit failed: see the log above")
        flags: dict[str, list[tuple[float, float, str | None]]] = {}
        # The last check is one step before the day ends, where the data stops.
        for moment in day_start + STEP * np.arange(check_every, int(hours * 3600 / STEP), check_every):
            clock.at(moment, delay)
            started = time.perf_counter()
            job.score()
            result.score_seconds.append(time.perf_counter() - started)
            result.checks += 1
            _read(collector.collect(), moment, flags, result)
        _score(simulation, flags, result, day_start + hours * 3600)
        truth = [simulation.family[tenant] for tenant in simulation.tenants]
        entities = [job.entity_id({"namespace": tenant}) for tenant in simulation.tenants]
        groups = job._model.peers_.group_of(entities) if job._model.peers_ is not None else None
        if groups is not None:
            result.adjusted_rand = float(adjusted_rand_score(truth, groups))
            result.groups = int(np.unique(groups).size)
    finally:
        source.close()
    return result


def _read(families, moment: float, flags: dict, result: Evaluation) -> None:
    """Record each flagged tenant with its type, and every noisy-neighbour finding, at ``moment``."""
    scores, types = {}, {}
    for family in families:
        for sample in family.samples:
            labels = sample.labels
            if family.name == "anomaly_score":
                scores[labels["namespace"]] = sample.value
            elif family.name == "anomaly_type":
                types[labels["namespace"]] = labels["type"]
            elif family.name == "anomaly_multivariate_score" and sample.value >= 1:
                flags.setdefault(labels["namespace"], []).append((moment, -1.0, None))
            elif family.name == "anomaly_noisy_neighbor":
                result.noisy_found.add((labels["tenant"], labels["node"], labels["role"]))
    for tenant, score in scores.items():
        if score >= 1:
            flags.setdefault(tenant, []).append((moment, score, types.get(tenant)))


def _score(simulation: TenantSimulation, flags: dict, result: Evaluation, until: float) -> None:
    anomalies = [a for a in simulation.anomalies if a.start < until]
    for anomaly in anomalies:
        if anomaly.role:
            result.noisy_truth.add((anomaly.tenant, simulation.node[anomaly.tenant], anomaly.role))
        window = [(moment, score, kind) for moment, score, kind in flags.get(anomaly.tenant, [])
                  if anomaly.start <= moment < anomaly.end + GRACE_SECONDS]
        if anomaly.kind == "multivariate":
            result.found.setdefault("multivariate", []).append(bool(window))
            continue
        scored = [kind for _, score, kind in window if score >= 0]
        result.found.setdefault(anomaly.kind, []).append(bool(scored))
        if scored:
            named = Counter(kind for kind in scored if kind is not None).most_common(1)
            expected = "behavioural" if anomaly.role == "affected" else EXPECTED_TYPE[anomaly.kind]
            result.typed_right.setdefault(anomaly.kind, []).append(bool(named) and named[0][0] == expected)
    for tenant, entries in flags.items():
        for moment, score, kind in entries:
            if score < 0:
                continue
            inside = any(a.tenant == tenant and a.start <= moment < a.end + GRACE_SECONDS for a in anomalies)
            counts = result.flags_by_type.setdefault(kind or "none", [0, 0])
            counts[0 if inside else 1] += 1
            if inside:
                result.true_flags += 1
            else:
                result.false_flags += 1
                result.false_alarm_tenants.add(tenant)


def report(evaluation: Evaluation, backfill_seconds: float) -> str:
    """Render the benchmark section."""
    lines = [
        f"The [kubernetes-tenants preset](../examples/presets/kubernetes-tenants.yaml) on the tenant "
        f"simulator: {evaluation.tenants} tenants on {evaluation.nodes} nodes, {evaluation.days} days at "
        "5 minutes with daily and weekly cycles, written as cAdvisor and kube-state-metrics series and "
        f"backfilled into Prometheus ({backfill_seconds:.0f} s). One fit on the first {evaluation.days - 1} "
        f"days, then {evaluation.checks} score runs through the last day, which carries the injected "
        "anomalies. A flag is `anomaly_score >= 1`. Produced by `python -m bench.tenants`; the scoring "
        "rules are in its docstring.",
        "",
        "| injected kind | anomalies | found | type named right |",
        "|---|---|---|---|",
    ]
    for kind in sorted(evaluation.found):
        found = evaluation.found[kind]
        typed = evaluation.typed_right.get(kind, [])
        named = f"{sum(typed)} of {len(typed)}" if kind != "multivariate" else "not typed"
        lines.append(f"| {kind} | {len(found)} | {sum(found)} | {named} |")
    lines += ["", "| type named | flagged checks | precision |", "|---|---|---|"]
    for kind in sorted(evaluation.flags_by_type):
        true, false = evaluation.flags_by_type[kind]
        lines.append(f"| {kind} | {true + false} | {true / (true + false):.2f} |")
    noisy_hits = evaluation.noisy_found & evaluation.noisy_truth
    lines += [
        "",
        f"- Recall (every kind but multivariate): {evaluation.recall:.2f}. Precision over flagged "
        f"(tenant, check) pairs: {evaluation.precision:.2f} ({evaluation.true_flags} true, "
        f"{evaluation.false_flags} false, on {len(evaluation.false_alarm_tenants)} clean tenants).",
        f"- Noisy neighbour: {len(noisy_hits)} of {len(evaluation.noisy_truth)} (tenant, node, role) "
        f"findings reported, {len(evaluation.noisy_found - evaluation.noisy_truth)} reported that were not injected.",
        f"- Peer groups: {evaluation.groups} groups, adjusted Rand index {evaluation.adjusted_rand:.2f} "
        "against the 3 behaviour families.",
        f"- Times, query time included: fit {evaluation.fit_seconds:.1f} s; score run mean "
        f"{np.mean(evaluation.score_seconds):.2f} s, 95th percentile "
        f"{np.percentile(evaluation.score_seconds, 95):.2f} s.",
        f"- {environment_line()}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=5)
    # 14 days of history before the scored day, so the preset's 14d fit window runs unchanged.
    parser.add_argument("--days", type=int, default=15)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    simulation = simulation_for(args.tenants, args.nodes, args.days)
    with tempfile.TemporaryDirectory(prefix="bench-tenants-") as folder:
        started = time.perf_counter()
        prometheus = load(simulation, Path(folder))
        backfill_seconds = time.perf_counter() - started
        try:
            evaluation = evaluate(simulation, prometheus.url)
        finally:
            prometheus.close()
    body = report(evaluation, backfill_seconds)
    if args.no_write:
        print(body)
    else:
        print(write_section("tenants", "Tenants: the simulator through Prometheus", body))


if __name__ == "__main__":
    main()
