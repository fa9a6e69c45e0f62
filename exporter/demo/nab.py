"""Load the demo's NAB series, clean them, cut them inside an anomaly window and move them to now.

The files and their labelled windows live in ``examples/data/nab/`` (copied from the Numenta
Anomaly Benchmark, MIT licence). NAB timestamps carry no time zone. This module reads them as
UTC wall-clock times, which keeps the spacing between rows and is all a time shift needs.
"""

from __future__ import annotations

import datetime as dt
import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

# NOTE: this path exists only in a source checkout, because the wheel ships exporter/ and
# detectors/ but not examples/. Pass data_dir when the package is installed elsewhere.
DATA_DIR = Path(__file__).resolve().parents[2] / "examples" / "data" / "nab"
WINDOWS_FILE = "windows.json"

# Value of the ``cut`` argument that selects the file's default cut point from NAB_FILES.
DEFAULT_CUT = "default"

CutPoint = Union[str, dt.datetime, pd.Timestamp, None]

_EPOCH = pd.Timestamp("1970-01-01")
_ONE_SECOND = pd.Timedelta(seconds=1)


@dataclass(frozen=True)
class NabFile:
    """One NAB file of the demo and the Prometheus metric it becomes."""

    key: str
    """Path relative to the data folder, which is also the file's key in ``windows.json``."""
    metric: str
    help: str
    default_cut: str | None
    """Timestamp of the last row to keep, in the file's own clock, or None to keep every row."""

    @property
    def stem(self) -> str:
        return Path(self.key).stem


# The exporter scores the newest point of each series, so each default cut ends the series at a
# point inside a labelled window where the data is clearly abnormal. Then the demo's alerts fire
# on real data. Values quoted below were read from the files.
NAB_FILES: dict[str, NabFile] = {
    spec.stem: spec
    for spec in (
        NabFile(
            key="realKnownCause/machine_temperature_system_failure.csv",
            # NAB does not state the unit, so the name has no unit suffix.
            metric="nab_machine_temperature",
            help=(
                "Temperature of an internal component of a large industrial machine "
                "(NAB machine_temperature_system_failure, unit not stated by NAB)."
            ),
            # NAB's labelled point of the last window. By then the temperature has fallen from
            # about 90 to 26 over 32 hours, far below anything in the preceding weeks.
            default_cut="2014-02-08 14:30:00",
        ),
        NabFile(
            key="realAWSCloudwatch/ec2_cpu_utilization_ac20cd.csv",
            metric="nab_ec2_cpu_utilization_percent",
            help="CPU utilisation of one AWS EC2 instance as collected by CloudWatch, in percent.",
            # 70 minutes after NAB's labelled point 00:49, when CPU jumped from about 33 % to
            # between 88 % and 99.6 %. All of the last 15 rows stay in that range.
            default_cut="2014-04-15 01:59:00",
        ),
        NabFile(
            key="realAWSCloudwatch/elb_request_count_8c0756.csv",
            # Each sample counts the requests of one 5-minute period, so this is a gauge and
            # not a cumulative counter.
            metric="nab_elb_requests_per_5m",
            help="Requests received by one AWS Elastic Load Balancer in each 5-minute period.",
            # 15 minutes after NAB's labelled point 19:34, with 656 requests, the largest value in
            # the file. The last four rows (656, 256, 195, 338) are all above the
            # file's 95th percentile of 170.
            default_cut="2014-04-22 19:49:00",
        ),
    )
}


@dataclass
class CleaningReport:
    """Findings and fixes of ``read_nab_csv`` for one file."""

    path: str
    rows_read: int = 0
    invalid_rows_dropped: int = 0
    """Rows whose timestamp or value could not be parsed, or whose value is not finite."""
    backward_steps: int = 0
    """Places where a timestamp is earlier than the row before it, in file order."""
    duplicate_timestamps_dropped: int = 0
    missing_final_newline: bool = False
    median_step_seconds: float = math.nan
    gaps: int = 0
    """Intervals longer than twice the median step. Gaps are reported, never filled."""
    longest_gap_seconds: float = 0.0

    @property
    def changed(self) -> bool:
        """Whether cleaning dropped or reordered any row."""
        return bool(self.invalid_rows_dropped or self.backward_steps or self.duplicate_timestamps_dropped)

    def summary(self) -> str:
        return (
            f"{self.path}: {self.rows_read} rows read, {self.invalid_rows_dropped} invalid rows dropped, "
            f"{self.backward_steps} backward steps sorted, "
            f"{self.duplicate_timestamps_dropped} duplicate timestamps dropped (kept the last), "
            f"{self.gaps} gaps longer than twice the median step of {self.median_step_seconds:g} s "
            f"(longest {self.longest_gap_seconds:g} s), "
            f"final newline {'missing' if self.missing_final_newline else 'present'}"
        )


@dataclass
class NabSeries:
    """One NAB file cut and shifted in time, ready to be written as Prometheus history."""

    metric: str
    help: str
    labels: dict[str, str]
    timestamps: np.ndarray
    """Unix time in seconds (float64), strictly increasing."""
    values: np.ndarray
    windows: list[tuple[float, float]]
    """Labelled anomaly windows in unix seconds, shifted like the timestamps.

    Only windows that overlap the kept rows are listed. The window that contains the cut point
    keeps its original end, so it may end after the last timestamp.
    """
    shift_seconds: float
    """Amount added to the file's timestamps, read as UTC, to produce ``timestamps``."""
    cut_at: pd.Timestamp | None
    report: CleaningReport = field(repr=False)


def read_nab_csv(path: str | Path) -> tuple[pd.Series, CleaningReport]:
    """Read a NAB ``timestamp,value`` CSV file into a sorted series without duplicate timestamps.

    Rows are sorted by timestamp with a stable sort, and of rows that share a timestamp the one
    that comes last in the file is kept. This covers the repeated hour of a daylight-saving switch
    and the repeated block in machine_temperature_system_failure.csv. Unparseable rows are
    dropped. Gaps are reported and left as they are. Raises ValueError when the header lacks a
    ``timestamp`` or ``value`` column or no valid row remains.
    """
    path = Path(path)
    report = CleaningReport(path=str(path))

    raw = path.read_bytes()
    report.missing_final_newline = bool(raw) and not raw.endswith(b"\n")
    rows = [row for row in csv.reader(io.StringIO(raw.decode("utf-8-sig"))) if any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"invalid NAB file {path}: the file is empty, expected a 'timestamp,value' header")
    header = [cell.strip().lower() for cell in rows[0]]
    missing = {"timestamp", "value"} - set(header)
    if missing:
        raise ValueError(
            f"invalid NAB file {path}: missing column(s) {sorted(missing)} in header {rows[0]}. "
            "Expected a 'timestamp,value' header"
        )
    body = rows[1:]
    report.rows_read = len(body)

    # A row with the wrong number of fields becomes empty strings, which parse as invalid below.
    well_formed = [row if len(row) == len(header) else [""] * len(header) for row in body]
    frame = pd.DataFrame(well_formed, columns=header, dtype=str)
    timestamps = _parse_timestamps(frame["timestamp"])
    values = pd.to_numeric(frame["value"].str.strip(), errors="coerce").to_numpy(dtype=float)
    valid = timestamps.notna().to_numpy() & np.isfinite(values)
    report.invalid_rows_dropped = int((~valid).sum())
    series = pd.Series(values[valid], index=pd.DatetimeIndex(timestamps[valid]), name="value")

    # Backward steps are counted in file order, before sorting hides them.
    report.backward_steps = int((np.diff(series.index.to_numpy()) < np.timedelta64(0, "s")).sum())
    series = series.sort_index(kind="stable")
    duplicated = series.index.duplicated(keep="last")
    report.duplicate_timestamps_dropped = int(duplicated.sum())
    series = series[~duplicated]
    if series.empty:
        raise ValueError(f"invalid NAB file {path}: no row has both a valid timestamp and a finite value")

    _measure_gaps(series.index, report)
    return series, report


def _parse_timestamps(column: pd.Series) -> pd.Series:
    """Parse ISO 8601 timestamps to naive UTC. Naive input is taken as UTC, offsets are applied."""
    stripped = column.str.strip()
    parsed = pd.to_datetime(stripped, format="ISO8601", errors="coerce", utc=True)
    return parsed.dt.tz_localize(None)


def _measure_gaps(index: pd.DatetimeIndex, report: CleaningReport) -> None:
    if len(index) < 2:
        return
    steps = np.diff(index.to_numpy()) / np.timedelta64(1, "s")
    report.median_step_seconds = float(np.median(steps))
    report.gaps = int((steps > 2 * report.median_step_seconds).sum())
    report.longest_gap_seconds = float(steps.max())


def read_windows(path: str | Path) -> dict[str, list[tuple[pd.Timestamp, pd.Timestamp]]]:
    """Read NAB's ``combined_windows.json`` format: file key to a list of ``[start, end]`` strings."""
    path = Path(path)
    with path.open(encoding="utf-8") as stream:
        document = json.load(stream)
    windows: dict[str, list[tuple[pd.Timestamp, pd.Timestamp]]] = {}
    for key, pairs in document.items():
        parsed = []
        for pair in pairs:
            if len(pair) != 2:
                raise ValueError(f"invalid window {pair!r} for {key} in {path}: expected [start, end]")
            start, end = pd.Timestamp(pair[0]), pd.Timestamp(pair[1])
            if end < start:
                raise ValueError(f"invalid window {pair!r} for {key} in {path}: end is before start")
            parsed.append((start, end))
        windows[key] = parsed
    return windows


def to_unix_seconds(timestamps: pd.DatetimeIndex) -> np.ndarray:
    """Convert naive timestamps, read as UTC, to unix seconds (float64)."""
    return ((timestamps - _EPOCH) / _ONE_SECOND).to_numpy(dtype=float)


def shift_to_end(timestamps: pd.DatetimeIndex, end_time: float) -> np.ndarray:
    """Move sorted timestamps in time so that the last one lands exactly on ``end_time``.

    Returns unix seconds (float64). Each result is ``end_time`` minus the original distance to the
    last timestamp, so the last element equals ``end_time`` without rounding error.
    """
    if len(timestamps) == 0:
        raise ValueError("cannot shift an empty series")
    seconds_before_end = ((timestamps[-1] - timestamps) / _ONE_SECOND).to_numpy(dtype=float)
    return float(end_time) - seconds_before_end


def load_series(
    file: str | NabFile,
    end_time: float,
    *,
    cut: CutPoint = DEFAULT_CUT,
    history_seconds: float | None = None,
    data_dir: str | Path = DATA_DIR,
    job: str = "nab",
    instance: str = "nab",
) -> NabSeries:
    """Load one NAB file, cut it, and shift it so that its last kept row is at ``end_time``.

    ``file`` is a stem from NAB_FILES or a NabFile. ``cut`` is ``DEFAULT_CUT`` for the file's
    default, None to keep every row, or the timestamp of the last row to keep in the file's own
    clock (rows after it are dropped). ``history_seconds`` drops rows older than that many
    seconds before the cut. Raises ValueError when fewer than two rows remain.
    """
    if isinstance(file, str) and file not in NAB_FILES:
        raise ValueError(f"unknown NAB file stem {file!r}: expected one of {sorted(NAB_FILES)} or a NabFile")
    spec = NAB_FILES[file] if isinstance(file, str) else file
    data_dir = Path(data_dir)
    series, report = read_nab_csv(data_dir / spec.key)
    log = logger.info
    log("read NAB file: %s", report.summary())

    cut_at = _resolve_cut(spec, cut)
    if cut_at is not None:
        if cut_at < series.index[0] or cut_at > series.index[-1]:
            raise ValueError(
                f"cut point {cut_at} for {spec.stem} is outside the file's range "
                f"{series.index[0]} to {series.index[-1]}"
            )
        series = series[series.index <= cut_at]
    if history_seconds is not None:
        if history_seconds <= 0:
            raise ValueError(f"invalid history_seconds {history_seconds!r}: expected a positive number")
        oldest = series.index[-1] - pd.Timedelta(seconds=history_seconds)
        series = series[series.index >= oldest]
    if len(series) < 2:
        raise ValueError(f"only {len(series)} row(s) of {spec.stem} remain after the cut. Move the cut point later")

    labelled_windows = _windows_for(spec, data_dir)
    if cut_at is not None and not any(start <= cut_at <= end for start, end in labelled_windows):
        logger.warning("cut point %s of %s lies outside every labelled window", cut_at, spec.stem)

    timestamps = shift_to_end(series.index, end_time)
    shift_seconds = float(end_time) - float(to_unix_seconds(series.index[-1:])[0])
    windows = _shift_windows(labelled_windows, series.index, shift_seconds)

    return NabSeries(
        metric=spec.metric,
        help=spec.help,
        labels={"job": job, "instance": instance, "series": spec.stem},
        timestamps=timestamps,
        values=series.to_numpy(dtype=float),
        windows=windows,
        shift_seconds=shift_seconds,
        cut_at=cut_at,
        report=report,
    )


def load_all(
    end_time: float,
    *,
    cuts: Mapping[str, CutPoint] | None = None,
    history_seconds: float | None = None,
    data_dir: str | Path = DATA_DIR,
    files: Sequence[str] | None = None,
) -> list[NabSeries]:
    """Load every demo NAB file (or the stems in ``files``) so that each ends at ``end_time``.

    ``cuts`` overrides the cut point of some stems. The others use their default.
    """
    cuts = dict(cuts or {})
    unknown = set(cuts) - set(NAB_FILES)
    if unknown:
        raise ValueError(f"unknown NAB file stem(s) {sorted(unknown)} in cuts: expected some of {sorted(NAB_FILES)}")
    stems = list(files) if files is not None else list(NAB_FILES)
    return [
        load_series(
            stem,
            end_time,
            cut=cuts.get(stem, DEFAULT_CUT),
            history_seconds=history_seconds,
            data_dir=data_dir,
        )
        for stem in stems
    ]


def _resolve_cut(spec: NabFile, cut: CutPoint) -> pd.Timestamp | None:
    if isinstance(cut, str) and cut == DEFAULT_CUT:
        cut = spec.default_cut
    if cut is None:
        return None
    try:
        timestamp = pd.Timestamp(cut)
    except ValueError as error:
        raise ValueError(f"invalid cut point {cut!r} for {spec.stem}: expected a timestamp such as 2014-04-15 01:59:00") from error
    if timestamp.tzinfo is not None:
        timestamp = timestamp.tz_convert("UTC").tz_localize(None)
    return timestamp


def _windows_for(spec: NabFile, data_dir: Path) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    path = data_dir / WINDOWS_FILE
    if not path.exists():
        logger.warning("no %s in %s, so %s has no labelled windows", WINDOWS_FILE, data_dir, spec.stem)
        return []
    return read_windows(path).get(spec.key, [])


def _shift_windows(
    windows: list[tuple[pd.Timestamp, pd.Timestamp]], kept: pd.DatetimeIndex, shift_seconds: float
) -> list[tuple[float, float]]:
    shifted = []
    for start, end in windows:
        if start > kept[-1] or end < kept[0]:
            continue
        start_unix, end_unix = to_unix_seconds(pd.DatetimeIndex([start, end]))
        shifted.append((float(start_unix) + shift_seconds, float(end_unix) + shift_seconds))
    return shifted
