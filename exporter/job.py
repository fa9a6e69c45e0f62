"""One configured detector at run time: its fit and score runs and its latest results.

A job queries the source, turns the result into a panel the detector type understands,
and publishes an immutable Snapshot that the /metrics collector reads. Fit and score runs
are separate: scoring goes on with the current model while a refit runs, and the new model
is swapped in whole when it is ready.
"""

import copy
import hashlib
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from detectors import detector_class
from detectors.base import StateError
from detectors.multi import EntityResult, MultiInput, QueryPanel, Sample
from exporter.config import RESERVED_LABELS, DetectorConfig
from exporter.metrics import SelfMetrics
from exporter.sharding import Shard
from exporter.source import Panel, PrometheusSource, QueryError, SourceUnavailable
from exporter.store import StateStore

log = logging.getLogger(__name__)

# A repeated warning or error is logged again after this long, and at DEBUG in between.
REPEAT_LOG_SECONDS = 600.0

# How far back a score run catches up after a restart or an outage, at most.
MAX_CATCH_UP_SECONDS = 86400.0


class JobError(Exception):
    """A run failed for a reason the user must fix (for example a label clash); not retried early."""


# Errors a run reports as a failure with their message; any other error is logged with its traceback.
RUN_ERRORS = (QueryError, SourceUnavailable, JobError, ValueError, StateError, ImportError)


@dataclass(frozen=True)
class Snapshot:
    """Latest results per known series, aligned by index; replaced whole after every run."""

    labels: list[dict[str, str]]
    sample_time: np.ndarray
    score: np.ndarray
    expected: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    ready: np.ndarray
    extra: tuple[tuple[Sample, ...], ...] = ()
    """Per series, the samples of further families (multi-query types); empty for single-query ones."""


def series_key(labels: dict[str, str]) -> tuple:
    return tuple(sorted(labels.items()))


def to_increase_rate(values: np.ndarray, step: float) -> np.ndarray:
    """Turn counter samples into per-second rates, treating a decrease as a counter reset."""
    increase = np.diff(values, axis=1)
    reset = increase < 0
    increase[reset] = values[:, 1:][reset]
    rate = np.full(values.shape, np.nan)
    rate[:, 1:] = increase / step
    return rate


class DetectorJob:
    """Runs one detector: ``fit`` and ``score`` are called by the scheduler."""

    def __init__(
        self,
        config: DetectorConfig,
        source: PrometheusSource,
        store: StateStore,
        metrics: SelfMetrics,
        clock=time.time,
        shard: Shard = Shard(),
    ):
        self.config = config
        self.shard = shard
        self.source = source
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.snapshot: Snapshot | None = None
        self._model = None
        self._model_keys: dict[tuple, int] = {}
        self._last_scored: float | None = None
        self._latest: dict[tuple, tuple] = {}
        self._score_lock = threading.Lock()
        self._swap_lock = threading.Lock()
        self._empty_phases: set[str] = set()
        self._last_logged: dict[str, tuple[str, float]] = {}
        self._fingerprint = config.fingerprint()
        self._detector_type = detector_class(config.type)
        self._params = config.typed_params()
        self._retired = False
        # Children start at 0 so that increase() in the alert rules detects a first failure.
        for phase in ("fit", "score"):
            for result in ("success", "failure"):
                metrics.runs.labels(self.name, phase, result)

    @property
    def name(self) -> str:
        return self.config.name

    def retire(self) -> None:
        """Stop saving state and updating self-metrics, for a job that a reload removed or replaced.

        A run still in progress then finishes without overwriting the state file of the job
        that replaced it. Its counters go to a registry that /metrics does not serve, so the
        metrics of a removed detector do not come back.
        """
        self._retired = True
        self.metrics = SelfMetrics(CollectorRegistry())

    # Model state ------------------------------------------------------------------

    def new_detector(self):
        return self._detector_type(
            self._params, step=self.config.step, timezone=self.config.timezone, direction=self.config.direction
        )

    def load_state(self) -> bool:
        """Restore a saved model so scoring resumes before the first refit; False means refit."""
        loaded = self.store.load(self.name)
        if loaded is None:
            return False
        arrays, meta = loaded
        if meta.get("fingerprint") != self._fingerprint:
            log.info("detector=%s saved state was fitted with another configuration; refitting", self.name)
            return False
        try:
            keys = [series_key(labels) for labels in meta["series"]]
            {key: row for row, key in enumerate(keys)}
            model = self.new_detector().set_state(arrays, meta["detector"])
        except (StateError, KeyError, TypeError, AttributeError, ValueError, IndexError, OverflowError) as error:
            # Any damage a readable archive can carry means "refit", never a failed start.
            log.error("detector=%s saved state is incompatible, refitting: %s", self.name, error)
            return False
        if len(keys) != model.ready_.shape[0]:
            log.error("detector=%s saved state lists %d series for %d model rows, refitting",
                      self.name, len(keys), model.ready_.shape[0])
            return False
        self._install(model, keys)
        log.info("detector=%s loaded saved model of %d series fitted until %s",
                 self.name, len(keys), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(model.fitted_until_)))
        return True

    def _install(self, model, keys: list[tuple]) -> None:
        with self._swap_lock:
            self._model = model
            self._model_keys = {key: row for row, key in enumerate(keys)}
        self.metrics.model_age.labels(self.name).set_function(lambda m=model: max(0.0, self.clock() - m.fitted_until_))

    def _save(self, model, keys: list[tuple]) -> None:
        if self._retired:
            return
        arrays, detector_meta = model.get_state()
        meta = {
            "fingerprint": self._fingerprint,
            "detector": detector_meta,
            "series": [dict(key) for key in keys],
        }
        try:
            self.store.save(self.name, arrays, meta)
        except OSError as error:
            log.error("detector=%s could not save its model to %s: %s", self.name, self.store.directory, error)

    # Runs ---------------------------------------------------------------------------

    def _aligned_end(self) -> float:
        """Latest grid time not newer than now minus the ingestion delay."""
        step = self.config.step
        return math.floor((self.clock() - self.source.config.query_delay) / step) * step

    def query(self, start: float, end: float, phase: str) -> Panel:
        step = self.config.step
        query_start = start - step if self.config.counter else start
        panel = self.source.query_range(self.config.query, query_start, end, step)
        if self.config.counter and panel.values.shape[1]:
            panel.values = to_increase_rate(panel.values, step)[:, 1:]
            panel.timestamps = panel.timestamps[1:]
        if panel.non_finite_points:
            self.metrics.non_finite.labels(self.name).inc(panel.non_finite_points)
        if panel.duplicate_series:
            self.metrics.dropped.labels(self.name, "duplicate").inc(panel.duplicate_series)
        if panel.empty:
            self.metrics.empty_results.labels(self.name, phase).inc()
            if phase not in self._empty_phases:
                log.warning("detector=%s %s query returned no series: check the query and that its metrics exist",
                            self.name, phase)
            self._empty_phases.add(phase)
        else:
            self._empty_phases.discard(phase)
        return self._filter(panel, phase)

    def _filter(self, panel: Panel, phase: str) -> Panel:
        """Reject label clashes, drop series without entity labels, keep this shard's series and cap their count."""
        for labels in panel.labels:
            clashes = [name for name in RESERVED_LABELS if name in labels]
            if clashes:
                raise JobError(
                    f"query result has the label {clashes[0]!r}, which the exporter sets on its output: "
                    f"drop or rename it in the query, for example with label_replace or sum without ({clashes[0]})"
                )
        keep = [i for i, labels in enumerate(panel.labels) if all(name in labels for name in self.config.entity_labels)]
        missing = len(panel.labels) - len(keep)
        if missing:
            self.metrics.dropped.labels(self.name, "missing_entity_label").inc(missing)
            self._log_repeated(logging.WARNING, "missing_entity_label",
                               "detector=%s dropped %d series without all entity labels %s",
                               self.name, missing, self.config.entity_labels)
        # Series of entities that other shards own are theirs, not dropped, so they are not
        # counted. max_series below therefore applies to each shard's own series.
        # NOTE: every shard still receives the whole query result before this filter, so more
        # shards reduce neither the query API's load nor the memory of one query result.
        keep = [i for i in keep if self.shard.owns(panel.labels[i], self.config.entity_labels)]
        if len(keep) > self.config.max_series:
            keep.sort(key=lambda i: series_key(panel.labels[i]))
            over = len(keep) - self.config.max_series
            keep = sorted(keep[: self.config.max_series])
            self.metrics.dropped.labels(self.name, "max_series").inc(over)
            self._log_repeated(logging.WARNING, "max_series",
                               "detector=%s %s query returned %d series more than max_series=%d; dropped them",
                               self.name, phase, over, self.config.max_series)
        keep = self._drop_label_collisions(panel, keep)
        if len(keep) == len(panel.labels):
            return panel
        return Panel(panel.values[keep], panel.timestamps, [panel.labels[i] for i in keep])

    def _drop_label_collisions(self, panel: Panel, keep: list[int]) -> list[int]:
        """Drop series whose output labels equal an earlier one's, which static labels can cause.

        Prometheus would keep only one of two identical series, silently.
        """
        seen, unique = set(), []
        for index in keep:
            key = series_key(self.output_labels(panel.labels[index]))
            if key not in seen:
                seen.add(key)
                unique.append(index)
        collisions = len(keep) - len(unique)
        if collisions:
            self.metrics.dropped.labels(self.name, "label_collision").inc(collisions)
            self._log_repeated(logging.WARNING, "label_collision",
                               "detector=%s dropped %d series whose output labels equal another's: the static "
                               "labels %s replace input labels that told them apart; rename the static labels",
                               self.name, collisions, sorted(self.config.labels))
        return unique

    def _log_repeated(self, level: int, topic: str, message: str, *args) -> None:
        """Log a repeating message once, then again only when it changes or every REPEAT_LOG_SECONDS."""
        text = message % args
        last_text, last_time = self._last_logged.get(topic, (None, -np.inf))
        now = time.monotonic()
        if text != last_text or now - last_time >= REPEAT_LOG_SECONDS:
            log.log(level, text)
            self._last_logged[topic] = (text, now)
        else:
            log.debug(text)

    def fit(self) -> None:
        """Query the fit window, fit a new model, save it and swap it in."""
        started = time.monotonic()
        try:
            end = self._aligned_end()
            panel = self.query(end - self.config.fit_window, end, "fit")
            model = self.new_detector().fit(panel.values, panel.timestamps)
            keys = [series_key(labels) for labels in panel.labels]
            self._save(model, keys)
            self._install(model, keys)
            self._score_fit_tail(model, keys, panel, end)
        except RUN_ERRORS as error:
            self._failed("fit", started, error)
            return
        except Exception:  # noqa: BLE001 - one detector's bug must not stop the scheduler
            self._failed("fit", started, None)
            return
        finally:
            self.metrics.source_up.set(1 if self.source.up else 0)
        self._succeeded("fit", started)
        ready = int(np.count_nonzero(model.ready_))
        log.info("detector=%s fit %d series (%d ready) on %d points each in %.2fs",
                 self.name, len(keys), ready, panel.timestamps.size, time.monotonic() - started)

    def _score_fit_tail(self, model, keys: list[tuple], panel: Panel, end: float) -> None:
        """Publish results for the newest points of the fit data, so a new model shows at once.

        Without this, a series whose data stopped advancing (or a long step) would show no
        score until its next sample arrives.
        """
        recent = panel.timestamps >= end - self.config.stale_seconds
        if not recent.any():
            return
        tail = Panel(panel.values[:, recent], panel.timestamps[recent], panel.labels)
        # Scoring moves a model's level toward the points it scores, but the fit has already
        # set the level from these points. Scoring a copy keeps the installed model equal to
        # the saved one, so a restarted exporter scores like the one that fitted.
        with self._score_lock:
            self._score_panel(copy.deepcopy(model), {key: row for row, key in enumerate(keys)}, tail)
            self._last_scored = max(self._last_scored or end, end)
            self._publish()

    def score(self) -> None:
        """Score every new point since the last run and publish the latest result per series."""
        if not self._score_lock.acquire(blocking=False):
            log.debug("detector=%s score run skipped: the previous one is still running", self.name)
            return
        try:
            self._score_locked()
        finally:
            self._score_lock.release()

    def _score_locked(self) -> None:
        started = time.monotonic()
        with self._swap_lock:
            model, model_keys = self._model, self._model_keys
        try:
            end = self._aligned_end()
            start = self._score_start(model, end)
            if start > end:
                # Nothing new since the last run, which happens right after a fit.
                self._succeeded("score", started)
                return
            scored = self._score_range(model, model_keys, start, end)
        except RUN_ERRORS as error:
            self._failed("score", started, error)
            self._publish()
            return
        except Exception:  # noqa: BLE001 - one detector's bug must not stop the scheduler
            self._failed("score", started, None)
            self._publish()
            return
        finally:
            self.metrics.source_up.set(1 if self.source.up else 0)
        self._last_scored = end
        self._succeeded("score", started)
        snapshot = self._publish()
        states = self._count_states(snapshot)
        log.info("detector=%s scored %s: %s", self.name, scored, states)

    def _score_range(self, model, model_keys: dict[tuple, int], start: float, end: float) -> str:
        """Query and score the points from ``start`` to ``end``; return what was scored, for the log."""
        panel = self.query(start, end, "score")
        self._score_panel(model, model_keys, panel)
        return f"{panel.values.size} points of {len(panel.labels)} series"

    def _score_start(self, model, end: float) -> float:
        step = self.config.step
        earliest = end - max(self.config.stale_seconds, min(MAX_CATCH_UP_SECONDS, self.config.fit_window))
        resume = self._last_scored
        if model is not None and (resume is None or model.fitted_until_ > resume):
            resume = model.fitted_until_
        if resume is None:
            return end - self.config.stale_seconds
        return max(resume + step, earliest)

    def _score_panel(self, model, model_keys: dict[tuple, int], panel: Panel) -> None:
        n_series = len(panel.labels)
        if n_series == 0 or panel.timestamps.size == 0:
            return
        keys = [series_key(labels) for labels in panel.labels]
        rows = np.array([model_keys.get(key, -1) for key in keys], dtype=np.int64)
        known = rows >= 0
        nan = np.full(panel.values.shape, np.nan)
        score, expected, lower, upper = nan, nan, nan, nan
        if model is not None and known.any():
            result = model.score(panel.values[known], panel.timestamps, rows[known])
            score, expected, lower, upper = (np.full(panel.values.shape, np.nan) for _ in range(4))
            score[known], expected[known] = result.score, result.expected
            lower[known], upper[known] = result.lower, result.upper
            ready_rows = np.zeros(n_series, dtype=bool)
            ready_rows[known] = model.ready_[rows[known]]
        else:
            ready_rows = np.zeros(n_series, dtype=bool)

        # The latest column with a sample is what /metrics shows for each series.
        has_sample = ~np.isnan(panel.values)
        last = panel.values.shape[1] - 1 - np.argmax(has_sample[:, ::-1], axis=1)
        any_sample = has_sample.any(axis=1)
        for index in np.flatnonzero(any_sample):
            column = last[index]
            self._latest[keys[index]] = (
                panel.timestamps[column],
                score[index, column],
                expected[index, column],
                lower[index, column],
                upper[index, column],
                bool(ready_rows[index]),
                panel.labels[index],
            )

    def _publish(self) -> Snapshot:
        """Build and swap in a new snapshot; series not seen for longer than the fit window are forgotten."""
        horizon = self.clock() - max(self.config.fit_window, self.config.stale_seconds)
        for key in [k for k, entry in self._latest.items() if entry[0] < horizon]:
            del self._latest[key]
        entries = list(self._latest.values())
        snapshot = Snapshot(
            labels=[self.output_labels(entry[6]) for entry in entries],
            sample_time=np.array([entry[0] for entry in entries], dtype=np.float64),
            score=np.array([entry[1] for entry in entries], dtype=np.float64),
            expected=np.array([entry[2] for entry in entries], dtype=np.float64),
            lower=np.array([entry[3] for entry in entries], dtype=np.float64),
            upper=np.array([entry[4] for entry in entries], dtype=np.float64),
            ready=np.array([entry[5] for entry in entries], dtype=bool),
            extra=tuple(entry[7] if len(entry) > 7 else () for entry in entries),
        )
        self.snapshot = snapshot
        self._count_states(snapshot)
        return snapshot

    def output_labels(self, labels: dict[str, str]) -> dict[str, str]:
        output = dict(labels)
        output.update(self.config.labels)
        names = self.config.entity_labels or sorted(labels)
        output["entity"] = ",".join(f"{name}={labels.get(name, '')}" for name in names)
        output["detector"] = self.name
        return output

    def _count_states(self, snapshot: Snapshot) -> dict[str, int]:
        fresh = snapshot.sample_time >= self.clock() - self.config.stale_seconds
        counts = {
            "ready": int(np.count_nonzero(fresh & snapshot.ready)),
            "warming": int(np.count_nonzero(fresh & ~snapshot.ready)),
            "stale": int(np.count_nonzero(~fresh)),
        }
        for state, count in counts.items():
            self.metrics.series.labels(self.name, state).set(count)
        return counts

    def _succeeded(self, phase: str, started: float) -> None:
        self.metrics.runs.labels(self.name, phase, "success").inc()
        self.metrics.run_duration.labels(self.name, phase).observe(time.monotonic() - started)
        self.metrics.last_success.labels(self.name, phase).set(self.clock())

    def _failed(self, phase: str, started: float, error: Exception | None) -> None:
        self.metrics.runs.labels(self.name, phase, "failure").inc()
        self.metrics.run_duration.labels(self.name, phase).observe(time.monotonic() - started)
        if error is None:
            log.exception("detector=%s %s run failed with an unexpected error", self.name, phase)
        else:
            self._log_repeated(logging.ERROR, f"{phase} failure", "detector=%s %s run failed: %s",
                               self.name, phase, error)


class MultiQueryJob(DetectorJob):
    """Runs a multi-query detector type (tenant, equipment): one panel per key of ``queries``.

    Every input series is reduced to its entity labels plus the few labels the type requests
    (``QuerySpec``), so series of different queries about one entity line up. Results are
    per entity: a score and further samples (bands per feature, contributions, peer groups,
    noisy neighbours, anomaly types, fault scores).

    Fit and score runs run in different threads. ``_entity_lock`` guards the two mappings
    both change: the label values of each entity and the latest result per entity.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._specs = {key: self.new_detector().query_spec(key) for key in self.config.queries}
        self._entity_labels: dict[str, dict[str, str]] = {}
        self._entity_lock = threading.Lock()

    def entity_id(self, labels: dict[str, str]) -> str:
        return ",".join(f"{name}={labels.get(name, '')}" for name in self.config.entity_labels)

    # Model state ------------------------------------------------------------------

    def _model_path(self) -> Path | None:
        if self.store.directory is None:
            return None
        return self.store.directory / f"{self.name}.keras"

    def load_state(self) -> bool:
        loaded = self.store.load(self.name)
        if loaded is None:
            return False
        arrays, meta = loaded
        if meta.get("fingerprint") != self._fingerprint:
            log.info("detector=%s saved state was fitted with another configuration; refitting", self.name)
            return False
        try:
            model = self.new_detector()
            model_path = self._model_path() if model.needs_model_file else None
            if model_path is not None:
                _check_model_file(model_path, meta.get("model_file_sha256"))
            model.set_state(arrays, meta["detector"], model_path=model_path)
            entity_labels = {self.entity_id(labels): _string_labels(labels) for labels in meta["entities"]}
        except (StateError, KeyError, TypeError, AttributeError, ValueError, IndexError, OverflowError, OSError) as error:
            log.error("detector=%s saved state is incompatible, refitting: %s", self.name, error)
            return False
        except Exception as error:  # noqa: BLE001 - a damaged Keras file raises many kinds of errors
            log.error("detector=%s saved model cannot be loaded, refitting: %s", self.name, error)
            return False
        with self._entity_lock:
            self._entity_labels.update(entity_labels)
        self._install(model, [])
        log.info("detector=%s loaded saved model of %d entities fitted until %s", self.name,
                 int(model.ready_.size), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(model.fitted_until_)))
        return True

    def _save(self, model, keys: list[tuple]) -> None:
        """Save the model; a Keras file goes beside the archive, which records its SHA-256.

        The archive is renamed into place before the Keras file. Whatever step a crash or a
        concurrent save interrupts, a loaded archive whose hash does not match the Keras file
        beside it is refitted instead of scoring with another fit's network.
        """
        if self.store.directory is None or self._retired:
            return
        temporary = None
        if model.needs_model_file:
            temporary = self.store.directory / f".{self.name}.{uuid.uuid4().hex}.tmp.keras"
        try:
            arrays, detector_meta = model.get_state(model_path=temporary)
            with self._entity_lock:
                entities = list(self._entity_labels.values())
            meta = {"fingerprint": self._fingerprint, "detector": detector_meta, "entities": entities}
            if temporary is not None:
                meta["model_file_sha256"] = _sha256(temporary)
            self.store.save(self.name, arrays, meta)
            if temporary is not None:
                os.replace(temporary, self._model_path())
        except OSError as error:
            log.error("detector=%s could not save its model to %s: %s", self.name, self.store.directory, error)
        finally:
            if temporary is not None:
                temporary.unlink(missing_ok=True)

    # Runs ---------------------------------------------------------------------------

    def query(self, start: float, end: float, phase: str) -> MultiInput:
        from exporter.source import grid

        step = self.config.step
        timestamps = grid(start, end, step)
        panels, labels = {}, {}
        for key, promql in self.config.queries.items():
            # The source's messages do not say which of the detector's queries failed.
            try:
                panel = self.source.query_range(promql, start, end, step)
            except QueryError as error:
                raise QueryError(f"query {key!r}: {error}") from None
            except SourceUnavailable as error:
                raise SourceUnavailable(f"query {key!r}: {error}") from None
            if panel.non_finite_points:
                self.metrics.non_finite.labels(self.name).inc(panel.non_finite_points)
            if panel.duplicate_series:
                self.metrics.dropped.labels(self.name, "duplicate").inc(panel.duplicate_series)
            topic = f"{phase}:{key}"
            if panel.empty:
                self.metrics.empty_results.labels(self.name, phase).inc()
                if topic not in self._empty_phases:
                    log.warning("detector=%s %s query %r returned no series: check the query and that its metrics exist",
                                self.name, phase, key)
                self._empty_phases.add(topic)
            else:
                self._empty_phases.discard(topic)
            panels[key] = self._project(key, panel, timestamps.size, labels)
        panels = self._cap_entities(panels, phase)
        with self._entity_lock:
            for panel in panels.values():
                for entity in panel.entities:
                    if entity:
                        self._entity_labels.setdefault(entity, labels[entity])
            entity_labels = dict(self._entity_labels)
        return MultiInput(timestamps=timestamps, panels=panels, entity_labels=entity_labels)

    def _project(self, key: str, panel: Panel, width: int, entity_labels: dict[str, dict[str, str]]) -> QueryPanel:
        """Reduce each series to its entity id and the labels the type needs; drop what does not fit.

        The label values of every entity kept go into ``entity_labels``.
        """
        spec = self._specs[key]
        needed = list(self.config.entity_labels if spec.entity else ()) + list(spec.labels)
        rows, entities, kept_labels, seen = [], [], [], set()
        missing = duplicates = 0
        invalid: list[str] = []
        for index, labels in enumerate(panel.labels):
            if not all(name in labels for name in needed):
                missing += 1
                continue
            if spec.entity and not self.shard.owns(labels, self.config.entity_labels):
                continue
            bad = [labels[name] for name in spec.numeric_labels if not _is_non_negative_number(labels[name])]
            if bad:
                invalid += bad
                continue
            entity = self.entity_id(labels) if spec.entity else ""
            projected = {name: labels[name] for name in spec.labels}
            identity = (entity, tuple(sorted(projected.items())))
            if identity in seen:
                duplicates += 1
                continue
            seen.add(identity)
            if spec.entity:
                entity_labels.setdefault(entity, {name: labels[name] for name in self.config.entity_labels})
            rows.append(index)
            entities.append(entity)
            kept_labels.append(projected)
        if missing:
            self.metrics.dropped.labels(self.name, "missing_entity_label").inc(missing)
            self._log_repeated(logging.WARNING, f"missing_label:{key}",
                               "detector=%s dropped %d series of query %r without all of the labels %s",
                               self.name, missing, key, needed)
        if duplicates:
            self.metrics.dropped.labels(self.name, "duplicate").inc(duplicates)
            self._log_repeated(logging.WARNING, f"duplicate:{key}",
                               "detector=%s dropped %d series of query %r that repeat an entity: aggregate the "
                               "query by %s, for example with sum by (...)", self.name, duplicates, key, needed)
        if invalid:
            self.metrics.dropped.labels(self.name, "invalid_label").inc(len(invalid))
            self._log_repeated(logging.WARNING, f"invalid_label:{key}",
                               "detector=%s dropped %d series of query %r whose label %s is not a number of at "
                               "least 0, such as %s: rewrite the values in the query with label_replace",
                               self.name, len(invalid), key, " or ".join(spec.numeric_labels),
                               ", ".join(repr(value) for value in sorted(set(invalid))[:3]))
        values = panel.values[rows] if rows else np.empty((0, width))
        return QueryPanel(values, entities, kept_labels)

    def _cap_entities(self, panels: dict[str, QueryPanel], phase: str) -> dict[str, QueryPanel]:
        """Keep the first max_series entities, in label order, of the keys the type scores, in every key."""
        scored = {entity for key, panel in panels.items() if self._specs[key].scored for entity in panel.entities}
        scored.discard("")
        if len(scored) <= self.config.max_series:
            return panels
        allowed = set(sorted(scored)[: self.config.max_series])
        over = len(scored) - len(allowed)
        self.metrics.dropped.labels(self.name, "max_series").inc(over)
        self._log_repeated(logging.WARNING, "max_series",
                           "detector=%s %s queries returned %d entities more than max_series=%d; dropped them",
                           self.name, phase, over, self.config.max_series)
        capped = {}
        for key, panel in panels.items():
            if not self._specs[key].entity:
                capped[key] = panel
                continue
            keep = [row for row, entity in enumerate(panel.entities) if entity in allowed]
            capped[key] = QueryPanel(panel.values[keep], [panel.entities[row] for row in keep],
                                     [panel.labels[row] for row in keep])
        return capped

    def fit(self) -> None:
        started = time.monotonic()
        try:
            end = self._aligned_end()
            data = self.query(end - self.config.fit_window, end, "fit")
            self._forget_entities(data)
            with self._swap_lock:
                previous = self._model
            model = self.new_detector().fit(data, previous=previous)
            self._save(model, [])
            self._install_and_score_tail(model, data, end)
        except RUN_ERRORS as error:
            self._failed("fit", started, error)
            return
        except Exception:  # noqa: BLE001 - one detector's bug must not stop the scheduler
            self._failed("fit", started, None)
            return
        finally:
            self.metrics.source_up.set(1 if self.source.up else 0)
        self._succeeded("fit", started)
        for warning in getattr(model, "fit_warnings_", ()):
            self._log_repeated(logging.WARNING, f"fit warning:{warning}", "detector=%s %s", self.name, warning)
        ready = model.ready_
        log.info("detector=%s fit %d entities (%d ready) on %d points each in %.2fs", self.name, ready.size,
                 int(np.count_nonzero(ready)), data.timestamps.size, time.monotonic() - started)

    def _forget_entities(self, data: MultiInput) -> None:
        """Forget the labels of entities that left both the fit window and the latest results."""
        current = {entity for panel in data.panels.values() for entity in panel.entities}
        with self._entity_lock:
            current |= {key[0] for key in self._latest}
            self._entity_labels = {entity: labels for entity, labels in self._entity_labels.items() if entity in current}

    def _install_and_score_tail(self, model, data: MultiInput, end: float) -> None:
        """Swap in a new model and publish the results of the newest points of its fit data.

        A copy scores the tail, so the installed model stays equal to the saved one. The tail
        covers the type's recent-data windows too, and the model takes over the copy's
        buffers of them, so a window search such as the noisy-neighbour one does not start
        empty after every fit. The score lock keeps score runs off the model until then.
        """
        recent = data.timestamps >= end - max(self.config.stale_seconds, model.recent_seconds)
        scorer = model.scoring_copy() if recent.any() else None
        with self._score_lock:
            self._install(model, [])
            if scorer is None:
                return
            tail = MultiInput(
                timestamps=data.timestamps[recent],
                panels={key: QueryPanel(panel.values[:, recent], panel.entities, panel.labels)
                        for key, panel in data.panels.items()},
                entity_labels=data.entity_labels,
            )
            results = scorer.score(tail)
            model.copy_recent_from(scorer)
            self._store_results(results)
            self._last_scored = max(self._last_scored or end, end)
            self._publish()

    def _score_range(self, model, model_keys: dict[tuple, int], start: float, end: float) -> str:
        data = self.query(start, end, "score")
        results = model.score(data) if model is not None else self._warming(data)
        self._store_results(results)
        return f"{len(results)} entities"

    def _warming(self, data: MultiInput) -> list[EntityResult]:
        """Results before the first fit: every entity with data in a scored key is warming."""
        latest: dict[str, float] = {}
        for key, panel in data.panels.items():
            if not (self._specs[key].entity and self._specs[key].scored):
                continue
            for row, entity in enumerate(panel.entities):
                present = np.flatnonzero(~np.isnan(panel.values[row]))
                if present.size:
                    latest[entity] = max(latest.get(entity, -np.inf), float(data.timestamps[present[-1]]))
        return [EntityResult(entity, when, False, np.nan) for entity, when in latest.items()]

    def _store_results(self, results: list[EntityResult]) -> None:
        with self._entity_lock:
            for result in results:
                labels = self._entity_labels.get(result.entity)
                if labels is None:
                    continue
                self._latest[(result.entity,)] = (
                    result.sample_time, result.score, np.nan, np.nan, np.nan, result.ready, labels, result.samples,
                )

    def _publish(self) -> Snapshot:
        with self._entity_lock:
            return super()._publish()


def _is_non_negative_number(text: str) -> bool:
    try:
        number = float(text)
    except ValueError:
        return False
    return math.isfinite(number) and number >= 0


def _string_labels(labels: dict) -> dict[str, str]:
    """Return saved entity labels, raising TypeError unless every name and value is a string."""
    if not all(isinstance(name, str) and isinstance(value, str) for name, value in labels.items()):
        raise TypeError(f"saved entity labels {labels!r} are not all strings")
    return dict(labels)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_model_file(path: Path, expected: str | None) -> None:
    """Raise StateError unless ``path`` exists and has the SHA-256 the saved archive recorded."""
    if not path.is_file():
        raise StateError(f"the model file {path} is missing")
    if expected is None or _sha256(path) != expected:
        raise StateError(f"the model file {path} belongs to another fit than the saved state")


def make_job(config: DetectorConfig, *args, **kwargs) -> DetectorJob:
    """Return the job class that fits the detector's type, constructed with the given arguments."""
    job_class = MultiQueryJob if config.queries else DetectorJob
    return job_class(config, *args, **kwargs)
