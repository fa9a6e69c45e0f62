"""The interface of detector types that read several queries at once (tenant, equipment).

A single-query type such as ``seasonal`` gets one panel and returns one score per series. A
multi-query type gets one panel per key of the detector's ``queries`` on a shared time grid,
and returns results per entity: a score plus any number of extra samples such as
per-feature bands, contribution ratios, peer groups or fault scores.

The job projects every input series onto the labels the type asks for (``QuerySpec``), so a
type works with entity ids and a few named labels, never with raw label sets.
"""

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from pydantic import BaseModel


@dataclass(frozen=True)
class QuerySpec:
    """Requirements of a multi-query type on the series of one query key.

    ``entity``: each series belongs to an entity and must carry all the entity labels.
    ``labels``: further labels each series must carry, kept for the type (for example
    ``node``); series without them are dropped and counted.
    ``numeric_labels``: those of ``labels`` whose values must be finite numbers of at least 0,
    such as a band's frequency. Series with other values are dropped and counted.
    ``scored``: the type reports the entities of this key. An entity seen only in keys
    without it (placement, speed) gets no result, so it never shows as warming.
    """

    entity: bool = True
    labels: tuple[str, ...] = ()
    numeric_labels: tuple[str, ...] = ()
    scored: bool = True


@dataclass
class QueryPanel:
    """The series of one query key on the shared grid, one row per series."""

    values: np.ndarray
    """(rows, time) values, NaN where missing."""
    entities: list[str]
    """Entity id of each row ("" for queries that are not per entity)."""
    labels: list[dict[str, str]]
    """The labels of ``QuerySpec.labels`` of each row."""

    @classmethod
    def empty(cls, width: int) -> "QueryPanel":
        return cls(np.empty((0, width)), [], [])


@dataclass
class MultiInput:
    """Panels of every query key of a detector on one time grid."""

    timestamps: np.ndarray
    panels: dict[str, QueryPanel]
    entity_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    """The entity label values of each entity id, in the order of the detector's entity_labels."""

    def panel(self, key: str) -> QueryPanel:
        """Return the panel of ``key``, an empty one when the key is not configured."""
        return self.panels.get(key) or QueryPanel.empty(self.timestamps.size)


@dataclass(frozen=True)
class Sample:
    """One exposed value beyond the score: a family name, the labels it adds and the value."""

    family: str
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass(frozen=True)
class EntityResult:
    """Latest result of one entity: the newest time it had data, its score and extra samples.

    ``score`` is NaN when the entity is not ready or had no data to score at ``sample_time``.
    """

    entity: str
    sample_time: float
    ready: bool
    score: float
    samples: tuple[Sample, ...] = field(default=())


# A configuration problem: the key path below the detector, such as ("queries", "gpu"), and the message.
Problem = tuple[tuple[str | int, ...], str]


class MultiQueryDetector:
    """Base class of multi-query types; learned attributes end with ``_``.

    Subclasses set ``Params``, ``type_name`` and ``output_labels``, implement ``query_spec``,
    ``check_settings``, ``fit``, ``score``, ``get_state`` and ``set_state``, and set
    ``fitted_until_`` and ``ready_`` (one flag per entity of the fit). ``fit`` may append
    messages for the operator to ``fit_warnings_``.
    """

    Params: ClassVar[type[BaseModel]]
    type_name: ClassVar[str]
    multi_query: ClassVar[bool] = True
    output_labels: ClassVar[tuple[str, ...]] = ()
    """Labels the type adds to some of its series, so no entity or static label may use them."""

    fit_warnings_: list[str]

    def __init__(self, params: BaseModel, *, step: float, timezone: str = "UTC", direction: str = "both"):
        self.params = params
        self.step = float(step)
        self.timezone = timezone
        self.direction = direction

    @classmethod
    def check_settings(
        cls, keys: list[str], params: BaseModel, *, entity_labels: list[str], step: float, fit_window: float
    ) -> list[Problem]:
        """Return the problems of a detector's query keys and settings (empty when they can work).

        ``step`` and ``fit_window`` are in seconds. The checks cover what can be known
        before the first query, such as a fit window too short for the type's calibration.
        """
        raise NotImplementedError

    def query_spec(self, key: str) -> QuerySpec:
        raise NotImplementedError

    def fit(self, data: MultiInput, *, previous: "MultiQueryDetector | None" = None) -> "MultiQueryDetector":
        raise NotImplementedError

    def score(self, data: MultiInput) -> list[EntityResult]:
        raise NotImplementedError

    def get_state(self, model_path=None) -> tuple[dict[str, np.ndarray], dict]:
        raise NotImplementedError

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict, model_path=None) -> "MultiQueryDetector":
        raise NotImplementedError

    @property
    def needs_model_file(self) -> bool:
        """True when the state includes a file beside the archive (a Keras model)."""
        return False

    def scoring_copy(self) -> "MultiQueryDetector":
        """Return a copy that can score without changing this model's running state."""
        return copy.deepcopy(self)

    @property
    def recent_seconds(self) -> float:
        """Newest stretch of data the type keeps between score runs, such as a search window; 0 for none."""
        return 0.0

    def copy_recent_from(self, scored: "MultiQueryDetector") -> None:
        """Take over the recent-data buffers of a copy that scored the newest data of the fit.

        A fresh fit starts with empty buffers, so a window search would otherwise see only
        the columns scored since the fit. The fitted baselines stay as they are.
        """


def last_sample_columns(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return, per row, the index of its newest non-NaN column and whether it has any."""
    has_sample = ~np.isnan(values)
    if values.shape[1] == 0:
        return np.zeros(values.shape[0], dtype=np.int64), np.zeros(values.shape[0], dtype=bool)
    last = values.shape[1] - 1 - np.argmax(has_sample[:, ::-1], axis=1)
    return last, has_sample.any(axis=1)


def prefixed(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Return ``arrays`` with every name prefixed, to store several parts in one archive."""
    return {f"{prefix}{name}": array for name, array in arrays.items()}


def unprefixed(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Return the arrays whose names start with ``prefix``, without it."""
    return {name[len(prefix):]: array for name, array in arrays.items() if name.startswith(prefix)}
