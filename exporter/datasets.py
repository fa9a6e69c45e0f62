"""Loaders of the public labelled benchmark data: NAB, SKAB and SMD.

The data is not shipped with the package. By default it is read from ``../shared/datasets``
relative to the repository root (the folder that contains the ``exporter`` package), and the
environment variable ANOMALY_EXPORTER_DATASETS overrides that path. The folder contains ``NAB/``,
``SKAB/data/`` and ``SMD/`` laid out as in their public repositories.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from exporter.demo.nab import CleaningReport, read_nab_csv, read_windows
from exporter.evaluation import NabFileScores, NabProfile, nab_window_rows

DATASETS_ENV = "ANOMALY_EXPORTER_DATASETS"
REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
# NOTE: this default exists only in a source checkout next to the shared data. An installed
# package must set ANOMALY_EXPORTER_DATASETS.
DEFAULT_DATASETS_DIR = REPOSITORY_ROOT.parent / "shared" / "datasets"

NAB_WINDOWS_FILE = "labels/combined_windows.json"
SKAB_GROUPS = ("valve1", "valve2", "anomaly-free")
SMD_COLUMNS = 38


class DatasetsNotFoundError(FileNotFoundError):
    """The benchmark datasets folder, or a dataset inside it, does not exist."""


def datasets_dir() -> Path:
    """Return the benchmark datasets folder.

    Raises DatasetsNotFoundError, naming the path it looked at, when the folder does not exist.
    """
    configured = os.environ.get(DATASETS_ENV)
    path = Path(configured) if configured else DEFAULT_DATASETS_DIR
    if not path.is_dir():
        source = f"from {DATASETS_ENV}" if configured else f"the default, ../shared/datasets next to {REPOSITORY_ROOT}"
        raise DatasetsNotFoundError(
            f"benchmark datasets folder not found at {path} ({source}). "
            f"Set {DATASETS_ENV} to the folder that contains NAB/, SKAB/ and SMD/"
        )
    return path


def _dataset_dir(name: str, root: str | Path | None) -> Path:
    path = (Path(root) if root is not None else datasets_dir()) / name
    if not path.is_dir():
        raise DatasetsNotFoundError(f"{name} dataset not found at {path}: expected a {name}/ folder in the datasets folder")
    return path


# --- NAB -----------------------------------------------------------------------------------------


def nab_dir(root: str | Path | None = None) -> Path:
    """Return the NAB folder inside ``root``, or inside datasets_dir() when ``root`` is None."""
    return _dataset_dir("NAB", root)


def list_nab_files(root: str | Path | None = None) -> list[str]:
    """List NAB's data files as keys such as ``realKnownCause/nyc_taxi.csv``, sorted."""
    data = nab_dir(root) / "data"
    return sorted(path.relative_to(data).as_posix() for path in data.glob("*/*.csv"))


def read_nab_rows(key: str, root: str | Path | None = None) -> pd.DataFrame:
    """Read every row of a NAB data file in file order, which are the rows NAB's scorer counts.

    Duplicate timestamps, backward steps and gaps are kept, because NAB's windows, probation and
    detector results count rows. Returns columns ``timestamp`` (naive datetime) and ``value``
    (float, NaN where unparseable). Raises ValueError when a timestamp cannot be parsed.
    """
    path = nab_dir(root) / "data" / key
    frame = pd.read_csv(path, dtype=str, skipinitialspace=True)
    frame.columns = [column.strip().lower() for column in frame.columns]
    missing = {"timestamp", "value"} - set(frame.columns)
    if missing:
        raise ValueError(f"invalid NAB file {path}: missing column(s) {sorted(missing)}, expected a 'timestamp,value' header")

    timestamps = pd.to_datetime(frame["timestamp"].str.strip(), format="ISO8601", errors="coerce")
    invalid = np.flatnonzero(timestamps.isna().to_numpy())
    if len(invalid):
        raise ValueError(
            f"invalid NAB file {path}: {len(invalid)} unparseable timestamp(s), first in data row {invalid[0] + 1}"
        )
    values = pd.to_numeric(frame["value"].str.strip(), errors="coerce")
    return pd.DataFrame({"timestamp": timestamps, "value": values.astype(float)})


def read_nab_series(key: str, root: str | Path | None = None) -> tuple[pd.Series, CleaningReport]:
    """Read a NAB data file as a clean series for detectors that need one.

    The series is sorted by timestamp, keeps the last of rows that share a timestamp (the repeated
    hour of a daylight-saving switch, for example) and drops unparseable rows. Its rows therefore
    do not line up with NAB's scoring rows. Use read_nab_rows for those.
    """
    return read_nab_csv(nab_dir(root) / "data" / key)


def read_nab_windows(root: str | Path | None = None) -> dict[str, list[tuple[pd.Timestamp, pd.Timestamp]]]:
    """Read the labelled windows: file key to (start, end) timestamps, both inclusive."""
    return read_windows(nab_dir(root) / NAB_WINDOWS_FILE)


def read_nab_profiles(root: str | Path | None = None) -> dict[str, NabProfile]:
    """Read the cost profiles of ``config/profiles.json``: profile name to its weights."""
    path = nab_dir(root) / "config" / "profiles.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    profiles = {}
    for name, profile in document.items():
        costs = profile["CostMatrix"]
        profiles[name] = NabProfile(
            tp_weight=float(costs["tpWeight"]),
            fp_weight=float(costs["fpWeight"]),
            fn_weight=float(costs["fnWeight"]),
        )
    return profiles


def read_nab_thresholds(root: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Read the thresholds NAB chose for each published detector: detector to profile to threshold."""
    path = nab_dir(root) / "config" / "thresholds.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    return {
        detector: {profile: float(entry["threshold"]) for profile, entry in profiles.items()}
        for detector, profiles in document.items()
    }


def read_nab_published_scores(root: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Read the published normalised scores: detector to profile to score."""
    path = nab_dir(root) / "results" / "final_results.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    return {detector: {profile: float(score) for profile, score in scores.items()} for detector, scores in document.items()}


def read_nab_published_file_scores(detector: str, profile: str, root: str | Path | None = None) -> pd.DataFrame:
    """Read a detector's published per-file results for one profile, without the Totals row.

    Columns: File, Threshold, Score (raw), TP, TN, FP, FN and Total_Count, one row per file.
    """
    path = nab_dir(root) / "results" / detector / f"{detector}_{profile}_scores.csv"
    frame = pd.read_csv(path)
    return frame[frame["Detector"] != "Totals"].reset_index(drop=True)


def read_nab_detector_rows(detector: str, key: str, root: str | Path | None = None) -> pd.DataFrame:
    """Read a published detector's per-row results for one file.

    The file is ``results/<detector>/<category>/<detector>_<name>.csv.gz`` and has at least
    ``timestamp`` and ``anomaly_score``. Only the numenta detector's per-row results are in the
    datasets folder.
    """
    category, name = key.split("/", 1)
    path = nab_dir(root) / "results" / detector / category / f"{detector}_{name}.gz"
    if not path.is_file():
        raise DatasetsNotFoundError(f"per-row results of {detector} for {key} not found at {path}")
    frame = pd.read_csv(path)
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], format="ISO8601")
    return frame


def nab_corpus(scores_by_file: Mapping[str, np.ndarray], root: str | Path | None = None) -> list[NabFileScores]:
    """Pair each file's per-row scores with its labelled windows, ready for the NAB scorer.

    ``scores_by_file`` maps file keys to one score per row of read_nab_rows, in file order. Raises
    ValueError when a file's score count differs from its row count.
    """
    windows = read_nab_windows(root)
    corpus = []
    for key, scores in scores_by_file.items():
        rows = read_nab_rows(key, root)
        values = np.asarray(scores, dtype=float)
        if len(values) != len(rows):
            raise ValueError(
                f"length mismatch for {key}: {len(values)} scores but {len(rows)} rows, expected one score per row "
                "including rows with duplicate timestamps"
            )
        corpus.append(
            NabFileScores(name=key, scores=values, windows=nab_window_rows(rows["timestamp"], windows.get(key, [])))
        )
    return corpus


def load_nab_detector_corpus(detector: str = "numenta", root: str | Path | None = None) -> list[NabFileScores]:
    """Load a published detector's per-row scores for every NAB file, ready for the NAB scorer.

    Raises ValueError when a results file does not list the data file's timestamps in the same
    order, because the scores would then be scored against the wrong rows.
    """
    scores_by_file = {}
    for key in list_nab_files(root):
        results = read_nab_detector_rows(detector, key, root)
        rows = read_nab_rows(key, root)
        same_rows = len(results) == len(rows) and (results["timestamp"].to_numpy() == rows["timestamp"].to_numpy()).all()
        if not same_rows:
            raise ValueError(
                f"misaligned results of {detector} for {key}: {len(results)} result rows and {len(rows)} data rows "
                "do not have the same timestamps in the same order"
            )
        scores_by_file[key] = results["anomaly_score"].to_numpy(dtype=float)
    return nab_corpus(scores_by_file, root)


# --- SKAB ----------------------------------------------------------------------------------------


def list_skab_runs(root: str | Path | None = None) -> list[str]:
    """List the SKAB runs as keys such as ``valve1/3.csv``, by group and then by run number."""
    data = _dataset_dir("SKAB", root) / "data"
    keys = []
    for group in SKAB_GROUPS:
        paths = sorted((data / group).glob("*.csv"), key=_natural_sort_key)
        keys.extend(f"{group}/{path.name}" for path in paths)
    return keys


def read_skab_run(key: str, root: str | Path | None = None) -> pd.DataFrame:
    """Read one SKAB run: a datetime index, the 8 sensor columns and, in labelled runs, the
    integer ``anomaly`` and ``changepoint`` columns."""
    path = _dataset_dir("SKAB", root) / "data" / key
    frame = pd.read_csv(path, sep=";", index_col="datetime", parse_dates=["datetime"])
    for column in ("anomaly", "changepoint"):
        if column in frame.columns:
            frame[column] = frame[column].astype(int)
    return frame


def split_skab_run(frame: pd.DataFrame, train_rows: int = 400) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a SKAB run into training and test rows as SKAB's authors do: the first 400 rows train."""
    if not 0 < train_rows < len(frame):
        raise ValueError(f"invalid train_rows {train_rows}: expected 1 to {len(frame) - 1} for a run of {len(frame)} rows")
    return frame.iloc[:train_rows], frame.iloc[train_rows:]


# --- SMD -----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SmdMachine:
    """One SMD machine: the train and test halves (rows x 38 metrics) and the test labels."""

    name: str
    train: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    """One 0/1 integer per test row."""


def list_smd_machines(root: str | Path | None = None) -> list[str]:
    """List the SMD machines that have train, test and label files, such as ``machine-1-2``."""
    smd = _dataset_dir("SMD", root)
    names = [path.name.removesuffix(".txt.gz") for path in (smd / "test").glob("*.txt.gz")]
    complete = [
        name for name in names if (smd / "train" / f"{name}.txt.gz").is_file() and (smd / "test_label" / f"{name}.txt").is_file()
    ]
    return sorted(complete, key=_natural_sort_key)


def read_smd_machine(name: str, root: str | Path | None = None) -> SmdMachine:
    """Read one SMD machine's gzip-compressed train and test files and its test labels.

    Raises ValueError when a file does not have 38 columns or the labels do not match the test rows.
    """
    smd = _dataset_dir("SMD", root)
    train = _read_smd_matrix(smd / "train" / f"{name}.txt.gz")
    test = _read_smd_matrix(smd / "test" / f"{name}.txt.gz")
    label_path = smd / "test_label" / f"{name}.txt"
    labels = pd.read_csv(label_path, header=None).iloc[:, 0].to_numpy(dtype=np.int64)
    if len(labels) != len(test):
        raise ValueError(f"invalid SMD labels {label_path}: {len(labels)} labels for {len(test)} test rows")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"invalid SMD labels {label_path}: expected only 0 and 1")
    return SmdMachine(name=name, train=train, test=test, test_labels=labels)


def _read_smd_matrix(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetsNotFoundError(f"SMD file not found at {path}")
    matrix = pd.read_csv(path, header=None, dtype=float).to_numpy()
    if matrix.shape[1] != SMD_COLUMNS:
        raise ValueError(f"invalid SMD file {path}: {matrix.shape[1]} columns, expected {SMD_COLUMNS}")
    return matrix


def _natural_sort_key(item: str | Path) -> list:
    """Order names with numbers by value, so that ``2.csv`` comes before ``10.csv``."""
    name = item.name if isinstance(item, Path) else item
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
