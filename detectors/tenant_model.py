"""The ``tenant`` detector type: tenant baselines, peer groups, noisy neighbours and anomaly types.

It joins the parts built in ``detectors.tenant`` (per-metric baselines, the combined score
and the multivariate signal), ``detectors.peers`` (peer groups and peer scores) and
``detectors.noisy_neighbor`` into one multi-query type that the exporter runs. Query keys:

* metric keys (``cpu``, ``memory``, ``network_in``, ``network_out``, ``disk_io``,
  ``request_rate``, ``latency``): one series per tenant;
* ``node_cpu`` and ``node_memory``: utilisation from 0 to 1, one series per node;
* ``placement``: one series per (tenant, node) pair where the tenant runs.

The noisy-neighbour search runs when ``placement`` and a node utilisation key are set.
"""

import math
from typing import ClassVar

import numpy as np
from pydantic import ConfigDict, Field, field_validator

from detectors.base import STATE_FORMAT_VERSION, StateError
from detectors.multi import (
    EntityResult,
    MultiInput,
    MultiQueryDetector,
    Problem,
    QuerySpec,
    Sample,
    last_sample_columns,
    prefixed,
    unprefixed,
)
from detectors.noisy_neighbor import NoisyNeighborParams, find_noisy_neighbors
from detectors.peers import PeerGroups, PeerParams, current_vectors, profile_features
from detectors.tenant import (
    ANOMALY_TYPES,
    METRICS,
    MIN_CALIBRATION_COLUMNS,
    TenantDetector,
    TenantParams,
    classify_anomalies,
    to_cube,
)
from exporter.durations import format_duration, parse_duration

NODE_KEYS = ("node_cpu", "node_memory")
PLACEMENT_KEY = "placement"

# Node utilisation above this is no ratio from 0 to 1 (most likely a percentage), so a fit warns.
MAX_PLAUSIBLE_UTILISATION = 1.5

# TenantDetector.fit rejects fewer residual vectors than this in the held-out calibration part.
MIN_CALIBRATION_VECTORS = 2 * MIN_CALIBRATION_COLUMNS


def held_out_columns(params: TenantParams, step: float, columns: int) -> int:
    """Return the newest columns of a fit window that the fit holds out for calibration.

    It mirrors ``TenantDetector.fit``: ``params.calibration`` but at most a quarter of the window.
    """
    return min(int(round(parse_duration(params.calibration) / step)), columns // 4)


class TenantTypeParams(TenantParams):
    """Parameters of the ``tenant`` type: the baseline settings plus peers and noisy neighbours."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peers: PeerParams = PeerParams()
    """Peer grouping: k or its silhouette range, and the scale of the peer score."""

    peer_window: str = "15m"
    """Newest samples whose median is a tenant's current level in the peer comparison."""

    noisy_neighbor: NoisyNeighborParams = NoisyNeighborParams()
    """Thresholds of the noisy-neighbour search."""

    noisy_window: str = "30m"
    """Recent samples the noisy-neighbour search looks at; a finding lasts while these samples still show it."""

    node_label: str = Field(default="node", pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")
    """Label that names the node in the node_cpu, node_memory and placement queries."""

    @field_validator("peer_window", "noisy_window")
    @classmethod
    def _window(cls, value: str) -> str:
        if parse_duration(value) <= 0:
            raise ValueError(f"expected a positive duration such as 30m, got {value!r}")
        return value


class TenantTypeDetector(MultiQueryDetector):
    """Multi-query tenant detector; see the module docstring for its query keys."""

    Params = TenantTypeParams
    type_name: ClassVar[str] = "tenant"
    output_labels: ClassVar[tuple[str, ...]] = ("feature", "type", "node", "tenant", "role")

    @classmethod
    def check_settings(
        cls, keys: list[str], params: TenantTypeParams, *, entity_labels: list[str], step: float, fit_window: float
    ) -> list[Problem]:
        known = set(METRICS) | set(NODE_KEYS) | {PLACEMENT_KEY}
        problems: list[Problem] = [
            (("queries", key), f"unknown key {key!r} for the tenant type: expected metric keys ({', '.join(METRICS)}), "
             f"node keys ({', '.join(NODE_KEYS)}) or {PLACEMENT_KEY}")
            for key in keys if key not in known
        ]
        if not any(key in METRICS for key in keys):
            problems.append((("queries",), f"no metric key: set at least one of {', '.join(METRICS)}, such as "
                             "cpu: sum by (namespace) (rate(container_cpu_usage_seconds_total[5m]))"))
        has_node = any(key in NODE_KEYS for key in keys)
        if has_node != (PLACEMENT_KEY in keys):
            problems.append((("queries",), "the noisy-neighbour search needs both placement and node_cpu or "
                             "node_memory: set both or neither"))
        if (has_node or PLACEMENT_KEY in keys) and params.node_label in entity_labels:
            problems.append((("params", "node_label"), f"node label {params.node_label!r} is also an entity label: "
                             "set params.node_label to the label that names the node in the node_cpu, node_memory "
                             "and placement queries"))
        return problems + cls._window_problems(params, step, fit_window)

    @staticmethod
    def _window_problems(params: TenantTypeParams, step: float, fit_window: float) -> list[Problem]:
        """Check that the fit window leaves both the calibration part and min_history of baseline data."""
        columns = int(math.floor(fit_window / step + 1e-9)) + 1
        calibration_columns = int(round(parse_duration(params.calibration) / step))
        if calibration_columns < MIN_CALIBRATION_COLUMNS:
            return [(("params", "calibration"), f"calibration {params.calibration!r} is {calibration_columns} steps of "
                     f"{format_duration(step)}: the multivariate model needs at least {MIN_CALIBRATION_COLUMNS} "
                     f"held-out steps, so set at least {format_duration(MIN_CALIBRATION_COLUMNS * step)}")]
        if columns // 4 < MIN_CALIBRATION_COLUMNS:
            shortest = (4 * MIN_CALIBRATION_COLUMNS - 1) * step
            return [(("fit_window",), f"fit_window {format_duration(fit_window)} is {columns} points at step "
                     f"{format_duration(step)}: the tenant type holds out at most a quarter of them to calibrate, "
                     f"and needs at least {MIN_CALIBRATION_COLUMNS}, so set fit_window to at least {format_duration(shortest)}")]
        need = math.ceil(parse_duration(params.seasonal.min_history) / step - 1e-9)
        baseline = columns - held_out_columns(params, step, columns)
        if baseline >= need:
            return []
        enough = columns
        while enough - held_out_columns(params, step, enough) < need:
            enough += 1
        return [(("fit_window",), f"the baselines fit on fit_window {format_duration(fit_window)} minus its held-out "
                 f"calibration part, {format_duration(baseline * step)} of data, less than params.seasonal.min_history "
                 f"{params.seasonal.min_history}, so no tenant could ever be scored: set fit_window to at least "
                 f"{format_duration((enough - 1) * step)}, or lower seasonal.min_history or params.calibration")]

    def query_spec(self, key: str) -> QuerySpec:
        if key in NODE_KEYS:
            return QuerySpec(entity=False, labels=(self.params.node_label,), scored=False)
        if key == PLACEMENT_KEY:
            return QuerySpec(entity=True, labels=(self.params.node_label,), scored=False)
        return QuerySpec(entity=True)

    # --- fit -----------------------------------------------------------------------------------

    def _metric_rows(self, data: MultiInput) -> tuple[np.ndarray, list[str], list[str]]:
        values, tenants, metrics = [], [], []
        for metric in METRICS:
            panel = data.panel(metric)
            values.append(panel.values)
            tenants += panel.entities
            metrics += [metric] * len(panel.entities)
        return np.concatenate(values, axis=0), tenants, metrics

    def fit(self, data: MultiInput, *, previous: MultiQueryDetector | None = None) -> "TenantTypeDetector":
        values, tenants, metrics = self._metric_rows(data)
        if not tenants:
            raise ValueError("the metric queries returned no series: nothing to fit")
        self._check_history(values, tenants, data.timestamps)
        self.fit_warnings_ = self._node_warnings(data)
        self.baseline_ = TenantDetector(self.params, step=self.step, timezone=self.timezone)
        self.baseline_.fit(values, data.timestamps, tenants=tenants, metrics=metrics)
        self.tenants_ = self.baseline_.tenants_
        self.fitted_until_ = float(data.timestamps[-1])

        self.peers_ = None
        if len(self.tenants_) >= max(2, self.params.peers.min_groups):
            cube = to_cube(values, self.baseline_.layout_, len(self.tenants_), len(self.baseline_.metrics_))
            profiles = profile_features(cube, data.timestamps, shape_blocks=self.params.peers.shape_blocks,
                                        timezone=self.timezone)
            old = getattr(previous, "peers_", None)
            if old is not None and old.centroids_.shape[1] != profiles.shape[1]:
                old = None  # the metrics changed, so the old groups cannot be matched
            self.peers_ = PeerGroups(self.params.peers).fit(profiles, self.tenants_, previous=old)
        self._reset_buffers()
        return self

    def _check_history(self, values: np.ndarray, tenants: list[str], timestamps: np.ndarray) -> None:
        """Raise ValueError, saying what is missing, when the data cannot train the multivariate model.

        The baselines of ``TenantDetector`` fit on the window without its held-out part and are
        ready only with ``seasonal.min_history`` of samples there. The multivariate model then
        needs enough (tenant, time) vectors with a ready metric in the held-out part.
        """
        columns = timestamps.size
        held_out = held_out_columns(self.params, self.step, columns)
        if held_out < MIN_CALIBRATION_COLUMNS:
            raise ValueError(
                f"the fit window has {columns} points at step {format_duration(self.step)}: the calibration part, "
                f"params.calibration but at most a quarter of them, needs at least {MIN_CALIBRATION_COLUMNS}, "
                f"so lengthen fit_window to at least {format_duration((4 * MIN_CALIBRATION_COLUMNS - 1) * self.step)}"
            )
        cut = columns - held_out
        history = np.count_nonzero(~np.isnan(values[:, :cut]), axis=1) * self.step
        min_history = self.params.seasonal.min_history
        ready = history >= parse_duration(min_history)
        part = f"the held-out calibration part, the newest {format_duration(held_out * self.step)} of the fit window"
        if not ready.any():
            raise ValueError(
                f"no tenant metric has params.seasonal.min_history ({min_history}) of samples before {part}; "
                f"the longest has {format_duration(float(history.max(initial=0.0)))}. The query API may not hold "
                "that much history yet: wait for it, or lower seasonal.min_history or params.calibration"
            )
        present = ready[:, None] & ~np.isnan(values[:, cut:])
        tenant_ids = {name: index for index, name in enumerate(dict.fromkeys(tenants))}
        rows = np.array([tenant_ids[name] for name in tenants])
        per_tenant = np.zeros((len(tenant_ids), held_out), dtype=bool)
        np.logical_or.at(per_tenant, rows, present)
        vectors = int(np.count_nonzero(per_tenant))
        if vectors < MIN_CALIBRATION_VECTORS:
            raise ValueError(
                f"{part} has {vectors} (tenant, time) samples with a ready baseline, and the multivariate model "
                f"needs at least {MIN_CALIBRATION_VECTORS}: wait for more data, or lengthen params.calibration"
            )

    def _node_warnings(self, data: MultiInput) -> list[str]:
        """Describe node utilisation series that are no ratio from 0 to 1."""
        warnings = []
        for key in NODE_KEYS:
            panel = data.panel(key)
            if not np.any(np.isfinite(panel.values)):
                continue
            peak = np.fmax.reduce(panel.values, axis=1)
            row = int(np.nanargmax(peak))
            if peak[row] > MAX_PLAUSIBLE_UTILISATION:
                node = panel.labels[row][self.params.node_label]
                warnings.append(
                    f"query {key} reaches {peak[row]:g} on node {node!r}: expected utilisation from 0 to 1, so "
                    "divide a percentage by 100; until then the noisy-neighbour search counts the node as stressed"
                )
        return warnings

    @property
    def recent_seconds(self) -> float:
        return max(parse_duration(self.params.peer_window), parse_duration(self.params.noisy_window))

    def copy_recent_from(self, scored: MultiQueryDetector) -> None:
        self.recent_raw_ = scored.recent_raw_
        self.recent_signed_ = scored.recent_signed_
        self.recent_time_ = scored.recent_time_
        self.recent_nodes_ = scored.recent_nodes_
        if hasattr(scored, "placement_"):
            self.placement_ = scored.placement_

    def _reset_buffers(self) -> None:
        n_tenants, n_metrics = len(self.tenants_), len(self.baseline_.metrics_)
        self.recent_raw_ = np.full((n_tenants, n_metrics, 0), np.nan)
        self.recent_signed_ = np.full((n_tenants, n_metrics, 0), np.nan)
        self.recent_time_ = np.empty(0)
        self.recent_nodes_: dict[str, np.ndarray] = {}

    @property
    def ready_(self) -> np.ndarray:
        """Per fitted tenant: True when at least one of its metrics has a ready baseline."""
        ready = np.zeros(len(self.tenants_), dtype=bool)
        np.logical_or.at(ready, self.baseline_.layout_[0], self.baseline_.ready_)
        return ready

    # --- score ---------------------------------------------------------------------------------

    def score(self, data: MultiInput) -> list[EntityResult]:
        values, tenants, metrics = self._metric_rows(data)
        timestamps = data.timestamps
        result = self.baseline_.score(values, timestamps, tenants=tenants, metrics=metrics)
        n_tenants, n_metrics = len(self.tenants_), len(result.metrics)

        fitted_rows = np.array([self.baseline_.row_keys_.get(key, -1) for key in zip(tenants, metrics)], dtype=np.int64)
        known = fitted_rows >= 0
        raw_fitted = np.full((self.baseline_.layout_.shape[1], timestamps.size), np.nan)
        raw_fitted[fitted_rows[known]] = values[known]
        raw = to_cube(raw_fitted, self.baseline_.layout_, n_tenants, n_metrics)
        self._remember(raw, result.signed, timestamps, data)

        peer = self._peer_scores()
        findings = self._noisy_neighbors(data)
        types = classify_anomalies(result.signed, result.metrics, np.nan_to_num(result.score) >= 1.0)

        ready = self.ready_
        has_data = ~np.all(np.isnan(raw), axis=1)  # (tenants, time)
        last, any_data = last_sample_columns(np.where(has_data, 0.0, np.nan))
        bands = self._bands_by_tenant(result, values, tenants, metrics, fitted_rows)

        output = []
        for t, tenant in enumerate(self.tenants_):
            if not any_data[t]:
                continue
            column = last[t]
            samples = []
            for m, metric in enumerate(result.metrics):
                feature = (("feature", metric),)
                if not np.isnan(result.metric_score[t, m, column]):
                    samples.append(Sample("anomaly_contribution_ratio", feature, result.contribution[t, m, column]))
                for family, value in bands.get((t, m, column), ()):
                    samples.append(Sample(family, feature, value))
            if not np.isnan(result.multivariate[t, column]):
                samples.append(Sample("anomaly_multivariate_score", (), result.multivariate[t, column]))
            if peer is not None:
                samples.append(Sample("anomaly_peer_group", (), float(peer.group[t])))
                if not np.isnan(peer.score[t]):
                    samples.append(Sample("anomaly_peer_score", (), peer.score[t]))
                    samples.append(Sample("anomaly_peer_outlier", (), float(peer.outlier[t])))
            if types[t, column] >= 0:
                samples.append(Sample("anomaly_type", (("type", ANOMALY_TYPES[types[t, column]]),), 1.0))
            for node, role in findings.get(tenant, ()):
                name = ",".join(data.entity_labels.get(tenant, {}).values()) or tenant
                samples.append(Sample("anomaly_noisy_neighbor",
                                      (("tenant", name), ("node", node), ("role", role)), 1.0))
            output.append(EntityResult(tenant, float(timestamps[column]), bool(ready[t]),
                                       float(result.score[t, column]), tuple(samples)))
        # Tenants the fit did not see are warming until the next fit includes them.
        seen = set(self.tenants_)
        for tenant in sorted(set(tenants) - seen):
            rows = [i for i, name in enumerate(tenants) if name == tenant]
            last_row, any_row = last_sample_columns(values[rows])
            if any_row.any():
                output.append(EntityResult(tenant, float(timestamps[last_row[any_row].max()]), False, np.nan))
        return output

    def _bands_by_tenant(self, result, values, tenants, metrics, fitted_rows) -> dict:
        """Map (tenant, metric, column) to its expected value and band at the newest sample of each row.

        The baseline also has values at grid points without a sample, so the newest column of
        ``expected`` alone can lie after the point a tenant's result is for.
        """
        bands = {}
        metric_index = {name: m for m, name in enumerate(result.metrics)}
        tenant_index = {name: t for t, name in enumerate(self.tenants_)}
        series = result.series
        last, any_row = last_sample_columns(np.where(np.isnan(values), np.nan, series.expected))
        for row in np.flatnonzero(any_row & (fitted_rows >= 0)):
            column = last[row]
            key = (tenant_index[tenants[row]], metric_index[metrics[row]], column)
            bands[key] = (
                ("anomaly_expected", series.expected[row, column]),
                ("anomaly_lower", series.lower[row, column]),
                ("anomaly_upper", series.upper[row, column]),
            )
        return bands

    def _window_columns(self, duration: str) -> int:
        return max(1, int(round(parse_duration(duration) / self.step)))

    def _remember(self, raw: np.ndarray, signed: np.ndarray, timestamps: np.ndarray, data: MultiInput) -> None:
        """Keep the newest samples the peer comparison and the noisy-neighbour search need."""
        keep = max(self._window_columns(self.params.peer_window), self._window_columns(self.params.noisy_window))
        self.recent_raw_ = np.concatenate([self.recent_raw_, raw], axis=2)[:, :, -keep:]
        self.recent_signed_ = np.concatenate([self.recent_signed_, signed], axis=2)[:, :, -keep:]
        previous_time = self.recent_time_
        self.recent_time_ = np.concatenate([previous_time, timestamps])[-keep:]
        # Node utilisation per node on the same columns, the larger of CPU and memory.
        utilisation: dict[str, np.ndarray] = {}
        for key in NODE_KEYS:
            panel = data.panel(key)
            for row, labels in enumerate(panel.labels):
                node = labels[self.params.node_label]
                current = utilisation.get(node, np.full(timestamps.size, np.nan))
                utilisation[node] = np.fmax(current, panel.values[row])
        nodes = {}
        for node in set(utilisation) | set(self.recent_nodes_):
            old = self.recent_nodes_.get(node, np.full(previous_time.size, np.nan))
            new = utilisation.get(node, np.full(timestamps.size, np.nan))
            nodes[node] = np.concatenate([old, new])[-keep:]
        self.recent_nodes_ = nodes
        # Placement: the nodes each tenant ran on in this panel.
        placement = data.panel(PLACEMENT_KEY)
        if placement.entities:
            self.placement_ = {}
            for row, tenant in enumerate(placement.entities):
                if not np.all(np.isnan(placement.values[row])):
                    self.placement_.setdefault(tenant, set()).add(placement.labels[row][self.params.node_label])

    def _peer_scores(self):
        if self.peers_ is None:
            return None
        width = self._window_columns(self.params.peer_window)
        current = current_vectors(self.recent_raw_[:, :, -width:])
        return self.peers_.score(current, self.tenants_)

    def _noisy_neighbors(self, data: MultiInput) -> dict[str, list[tuple[str, str]]]:
        """Return tenant -> [(node, role)] for the findings in the noisy window."""
        placement = getattr(self, "placement_", None)
        if not placement or not self.recent_nodes_:
            return {}
        width = self._window_columns(self.params.noisy_window)
        signed = self.recent_signed_[:, :, -width:]
        index = {name: t for t, name in enumerate(self.tenants_)}
        found: dict[str, list[tuple[str, str]]] = {}
        for node, utilisation in sorted(self.recent_nodes_.items()):
            members = sorted(index[name] for name, nodes in placement.items() if node in nodes and name in index)
            if len(members) < 2:
                continue
            findings = find_noisy_neighbors(
                signed[members], self.baseline_.metrics_, [self.tenants_[i] for i in members],
                utilisation[-signed.shape[2]:], node=node, params=self.params.noisy_neighbor,
            )
            for finding in findings:
                found.setdefault(finding.tenant, []).append((finding.node, finding.role))
        return found

    # --- state ---------------------------------------------------------------------------------

    def get_state(self, model_path=None) -> tuple[dict[str, np.ndarray], dict]:
        arrays, baseline_meta = self.baseline_.get_state()
        arrays = prefixed(arrays, "baseline_")
        meta = {
            "format_version": STATE_FORMAT_VERSION,
            "type": self.type_name,
            "baseline": baseline_meta,
            "fitted_until": self.fitted_until_,
            "peers": None,
        }
        if self.peers_ is not None:
            peer_arrays, meta["peers"] = self.peers_.get_state()
            arrays.update(prefixed(peer_arrays, "peers_"))
        return arrays, meta

    def set_state(self, arrays, meta, model_path=None) -> "TenantTypeDetector":
        if meta.get("format_version") != STATE_FORMAT_VERSION or meta.get("type") != self.type_name:
            raise StateError(f"state is for type {meta.get('type')!r}, expected {self.type_name!r}")
        try:
            baseline = TenantDetector(self.params, step=self.step, timezone=self.timezone)
            baseline.set_state(unprefixed(arrays, "baseline_"), meta["baseline"])
            peers = None
            if meta["peers"] is not None:
                peers = PeerGroups(self.params.peers).set_state(unprefixed(arrays, "peers_"), meta["peers"])
                if peers.tenants_ != baseline.tenants_:
                    raise StateError("saved peer groups list other tenants than the saved baselines")
            fitted_until = float(meta["fitted_until"])
        except (KeyError, TypeError) as error:
            raise StateError(f"state is incomplete or malformed: {error}") from None
        self.baseline_, self.peers_ = baseline, peers
        self.tenants_ = baseline.tenants_
        self.fitted_until_ = fitted_until
        self._reset_buffers()
        return self
