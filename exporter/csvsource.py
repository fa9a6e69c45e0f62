"""A source that reads series from CSV files instead of a query API, for backtests.

Each file contains a timestamp column and one or more value columns; each value column is a
series with the labels ``series`` (the file name without extension) and ``column``. A
detector's ``query`` is a regular expression that must match the whole ``series`` name.
Samples are placed on the query grid the way Prometheus evaluates a range query: the newest
sample at or before each grid time, if it is at most ``lookback`` old.
"""

import glob
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from exporter.source import Panel, QueryError, grid

log = logging.getLogger(__name__)

# Unix seconds of the year 5000: a larger numeric timestamp is in another unit.
MAX_UNIX_SECONDS = 95_617_584_000.0

# Prometheus' default lookback delta: how old a sample may be and still count at a grid time.
DEFAULT_LOOKBACK = 300.0


@dataclass
class _Series:
    labels: dict[str, str]
    times: np.ndarray
    values: np.ndarray


def _read_file(path: Path, timestamp_column: str, separator: str, exclude: set[str]) -> list[_Series]:
    frame = pd.read_csv(path, sep=separator)
    if timestamp_column not in frame.columns:
        raise QueryError(
            f"{path}: no column {timestamp_column!r}; the columns are {list(frame.columns)}: "
            "set source.csv.timestamp_column (and source.csv.separator if the columns look merged)"
        )
    if frame.empty:
        raise QueryError(f"{path}: the file has a header but no data rows")
    raw = frame[timestamp_column]
    if pd.api.types.is_numeric_dtype(raw):
        times = raw.to_numpy(dtype=np.float64)
        if np.nanmax(np.abs(times)) > MAX_UNIX_SECONDS:
            raise QueryError(
                f"{path}: timestamps such as {np.nanmax(times):.0f} are past the year 5000, so they look like "
                "milliseconds or nanoseconds: convert the column to Unix seconds or to date-times"
            )
    else:
        parsed = pd.to_datetime(raw, utc=True, errors="coerce", format="mixed")
        times = (parsed - pd.Timestamp("1970-01-01", tz="UTC")).dt.total_seconds().to_numpy()
    keep = np.isfinite(times)
    order = np.argsort(times[keep], kind="stable")
    times = times[keep][order]

    # Duplicate timestamps keep the last row, as a later write would win in Prometheus.
    last_of_each = np.r_[times[1:] != times[:-1], True] if times.size else np.zeros(0, dtype=bool)
    series = []
    for column in frame.columns:
        if column == timestamp_column or column in exclude:
            continue
        raw_values = frame[column]
        numbers = pd.to_numeric(raw_values, errors="coerce")
        unreadable = int((numbers.isna() & raw_values.notna()).sum())
        if unreadable:
            log.warning("%s: %d values of column %r are not numbers and count as missing; "
                        "list label columns in source.csv.exclude_columns", path, unreadable, column)
        values = numbers.to_numpy(dtype=np.float64)[keep][order]
        labels = {"series": path.stem, "column": str(column)}
        series.append(_Series(labels, times[last_of_each], values[last_of_each]))
    return series


class CsvSource:
    """Serves ``query_range`` from CSV files matched by a glob pattern."""

    up = True

    def __init__(self, pattern: str, *, timestamp_column: str = "timestamp", separator: str = ",",
                 exclude_columns=(), lookback: float = DEFAULT_LOOKBACK):
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        if not paths:
            raise FileNotFoundError(f"no CSV file matches {pattern!r}")
        self.paths = paths
        self.lookback = lookback
        self._series: list[_Series] = []
        for path in paths:
            self._series.extend(_read_file(path, timestamp_column, separator, set(exclude_columns)))
        log.info("read %d series from %d CSV files", len(self._series), len(paths))

    @classmethod
    def from_series(cls, series, *, lookback: float = DEFAULT_LOOKBACK) -> "CsvSource":
        """Build a source from in-memory ``(labels, unix times, values)`` triples, times sorted."""
        source = cls.__new__(cls)
        source.paths = []
        source.lookback = lookback
        source._series = [
            _Series(dict(labels), np.asarray(times, dtype=np.float64), np.asarray(values, dtype=np.float64))
            for labels, times, values in series
        ]
        return source

    def time_range(self, queries=None) -> tuple[float, float]:
        """Return the first and last timestamps of the series that any of ``queries`` selects (all by default)."""
        try:
            patterns = [re.compile(q) for q in queries] if queries else [re.compile(".*")]
        except re.error as error:
            raise QueryError(f"for a CSV source the query is a regular expression on the series name: {error}") from None
        chosen = [s for s in self._series if s.times.size and any(p.fullmatch(s.labels["series"]) for p in patterns)]
        if not chosen:
            raise QueryError(f"no CSV series matches the queries {list(queries or [])}")
        return float(min(s.times[0] for s in chosen)), float(max(s.times[-1] for s in chosen))

    def query_range(self, query: str, start: float, end: float, step: float) -> Panel:
        try:
            pattern = re.compile(query)
        except re.error as error:
            raise QueryError(f"for a CSV source the query is a regular expression on the series name: {error}") from None
        timestamps = grid(start, end, step)
        rows, labels, non_finite = [], [], 0
        for series in self._series:
            if not pattern.fullmatch(series.labels["series"]):
                continue
            row, dropped = self._on_grid(series, timestamps)
            if np.all(np.isnan(row)):
                continue
            rows.append(row)
            labels.append(dict(series.labels))
            non_finite += dropped
        values = np.vstack(rows) if rows else np.empty((0, timestamps.size))
        return Panel(values, timestamps, labels, non_finite)

    def _on_grid(self, series: _Series, timestamps: np.ndarray) -> tuple[np.ndarray, int]:
        index = np.searchsorted(series.times, timestamps, side="right") - 1
        found = index >= 0
        safe = np.where(found, index, 0)
        age = timestamps - series.times[safe]
        usable = found & (age <= self.lookback)
        row = np.where(usable, series.values[safe], np.nan)
        non_finite = int(np.count_nonzero(usable & ~np.isfinite(row)))
        row[~np.isfinite(row)] = np.nan
        return row, non_finite

    def close(self) -> None:
        pass
