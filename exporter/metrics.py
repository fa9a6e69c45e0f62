"""Exposition: the anomaly series collector and the exporter's self-monitoring metrics.

The collector only reads each detector's latest published results; a scrape never waits
on the query API.
"""

import platform
import time
from typing import Callable, Iterable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from exporter import __version__

# The *_created samples double the series count and no rule or dashboard uses them.
disable_created_metrics()

RUN_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

ANOMALY_FAMILIES = (
    ("anomaly_score", "Anomaly score: 0 as expected, 1 at the band edge (warning), 2 at the critical edge."),
    ("anomaly_expected", "Baseline value for the latest scored point, in the input's unit."),
    ("anomaly_lower", "Lower edge of the band (score 1) for the latest scored point, in the input's unit."),
    ("anomaly_upper", "Upper edge of the band (score 1) for the latest scored point, in the input's unit."),
)

# Families that multi-query types (tenant, equipment) add; each sample names its own labels.
EXTRA_FAMILIES = {
    "anomaly_contribution_ratio": "Share (0 to 1) of an entity's score that each input metric or sensor (feature label) contributes.",
    "anomaly_multivariate_score": "Score of the entity's vector of metric deviations against the shared IsolationForest; same scale as anomaly_score.",
    "anomaly_peer_group": "Peer group id of the tenant; ids stay the same across refits for matching groups.",
    "anomaly_peer_score": "Deviation of the tenant's current change from its peer group's; same scale as anomaly_score.",
    "anomaly_peer_outlier": "1 when the IsolationForest over all tenants' group-relative vectors flags the tenant, else 0.",
    "anomaly_noisy_neighbor": "1 for a tenant whose load coincides with others' degradation on a stressed node (role noisy) and for those tenants (role affected).",
    "anomaly_type": "1 for the current type of the entity's anomaly (type label); present only while anomaly_score is at least 1.",
    "anomaly_equipment_fault": "Score of a vibration fault signature (fault label) against the machine's healthy baseline; same scale as anomaly_score.",
}


class SelfMetrics:
    """The exporter's own metrics, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry):
        self.build_info = Gauge(
            "anomaly_exporter_build_info",
            "Always 1; labels carry the exporter and Python versions.",
            ["version", "python_version"],
            registry=registry,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.runs = Counter(
            "anomaly_exporter_runs",
            "Scheduled fit and score runs by outcome.",
            ["detector", "phase", "result"],
            registry=registry,
        )
        self.run_duration = Histogram(
            "anomaly_exporter_run_duration_seconds",
            "Duration of fit and score runs in seconds, query time included.",
            ["detector", "phase"],
            buckets=RUN_DURATION_BUCKETS,
            registry=registry,
        )
        self.source_up = Gauge(
            "anomaly_exporter_source_up",
            "1 when the last request reached the query API and got a non-5xx answer, else 0.",
            registry=registry,
        )
        self.series = Gauge(
            "anomaly_exporter_series",
            "Input series per state: ready (scored), warming (not enough history), stale (no recent sample).",
            ["detector", "state"],
            registry=registry,
        )
        self.dropped = Counter(
            "anomaly_exporter_series_dropped",
            "Input series dropped by reason (max_series, missing_entity_label, duplicate, label_collision, invalid_label).",
            ["detector", "reason"],
            registry=registry,
        )
        self.non_finite = Counter(
            "anomaly_exporter_non_finite_points",
            "Input points that were NaN or infinite and were treated as missing.",
            ["detector"],
            registry=registry,
        )
        self.empty_results = Counter(
            "anomaly_exporter_empty_results",
            "Queries that returned no series.",
            ["detector", "phase"],
            registry=registry,
        )
        self.last_success = Gauge(
            "anomaly_exporter_last_success_timestamp_seconds",
            "Unix time of the last successful run per phase.",
            ["detector", "phase"],
            registry=registry,
        )
        self.model_age = Gauge(
            "anomaly_exporter_model_age_seconds",
            "Seconds since the end of the data the current model was fitted on.",
            ["detector"],
            registry=registry,
        )
        self.config_reload_success = Gauge(
            "anomaly_exporter_config_last_reload_successful",
            "1 when the last configuration load succeeded, else 0.",
            registry=registry,
        )
        self.config_reload_time = Gauge(
            "anomaly_exporter_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load.",
            registry=registry,
        )
        # A process with no sharding options is shard 0 of 1.
        self.shard_index = Gauge(
            "anomaly_exporter_shard_index",
            "Index of this exporter's shard, from 0 to anomaly_exporter_shard_count - 1.",
            registry=registry,
        )
        self.shard_count = Gauge(
            "anomaly_exporter_shard_count",
            "Number of shards that split the entities between them.",
            registry=registry,
        )
        self.shard_count.set(1)

    def forget_detector(self, name: str) -> None:
        """Remove the labelled children of a detector that left the configuration."""
        for metric in (self.runs, self.run_duration, self.series, self.dropped, self.non_finite,
                       self.empty_results, self.last_success, self.model_age):
            for labels in list(metric._metrics):
                if labels and labels[0] == name:
                    metric.remove(*labels)


class AnomalyCollector(Collector):
    """Builds the ``anomaly_*`` families from the latest results of every detector job.

    ``jobs`` returns the current jobs; each job's ``snapshot`` is replaced whole by the job,
    so a scrape reads either the previous or the next run's results, never a mix.
    """

    def __init__(self, jobs: Callable[[], Iterable], clock: Callable[[], float] = time.time):
        self._jobs = jobs
        self._clock = clock

    def describe(self):
        return []

    def collect(self):
        families = {name: GaugeMetricFamily(name, text) for name, text in ANOMALY_FAMILIES}
        ready = GaugeMetricFamily(
            "anomaly_model_ready", "1 once the series' model has enough history to score, else 0."
        )
        extra: dict[str, GaugeMetricFamily] = {}
        now = self._clock()
        for job in self._jobs():
            snapshot = job.snapshot
            if snapshot is None:
                continue
            fresh = snapshot.sample_time >= now - job.config.stale_seconds
            for index in np.flatnonzero(fresh):
                labels = snapshot.labels[index]
                is_ready = bool(snapshot.ready[index])
                _add(ready, labels, 1.0 if is_ready else 0.0)
                if not is_ready or np.isnan(snapshot.score[index]):
                    continue
                _add(families["anomaly_score"], labels, snapshot.score[index])
                for name, values in (("anomaly_expected", snapshot.expected), ("anomaly_lower", snapshot.lower),
                                     ("anomaly_upper", snapshot.upper)):
                    if not np.isnan(values[index]):
                        _add(families[name], labels, values[index])
                if snapshot.extra:
                    for sample in snapshot.extra[index]:
                        family = families.get(sample.family) or extra.setdefault(
                            sample.family, GaugeMetricFamily(sample.family, EXTRA_FAMILIES.get(sample.family, "")))
                        _add(family, {**labels, **dict(sample.labels)}, sample.value)
        yield from families.values()
        yield ready
        yield from extra.values()


def _add(family: GaugeMetricFamily, labels: dict[str, str], value: float) -> None:
    # Each detector has its own label names, so samples are appended directly instead of
    # through add_metric, which fixes one set of label names per family.
    family.samples.append(Sample(family.name, labels, float(value), None))
