"""Fitted model state on disk: one ``.npz`` file per detector, written atomically, never pickled.

A file contains the detector's numeric arrays plus a JSON document (the detector's metadata,
the configuration fingerprint and the label sets of the fitted series) stored as bytes.
Files are loaded with ``allow_pickle=False``, so a tampered file cannot run code.
"""

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_META_KEY = "__meta__"


class StateStore:
    """Saves and loads detector state under ``directory``; ``None`` keeps nothing on disk."""

    def __init__(self, directory: Path | None):
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, detector_name: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{detector_name}.npz"

    def save(self, detector_name: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Write the state to a temporary file, flush it to disk, then rename it into place."""
        path = self.path(detector_name)
        if path is None:
            return
        for name, array in arrays.items():
            if np.asarray(array).dtype.kind not in "biuf":
                # np.savez would pickle an object array, and load() never unpickles.
                raise ValueError(f"state array {name!r} has dtype {np.asarray(array).dtype}; only numbers can be saved")
        payload = dict(arrays)
        payload[_META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{detector_name}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                np.savez(handle, **payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def load(self, detector_name: str) -> tuple[dict[str, np.ndarray], dict] | None:
        """Return (arrays, meta), or None when there is no file or it cannot be read.

        A corrupt file is logged and left for the next save to replace.
        """
        path = self.path(detector_name)
        if path is None or not path.exists():
            return None
        try:
            arrays, meta = _read_archive(path)
        # Damaged files make numpy, zipfile and zlib raise many unrelated types (seen: ValueError,
        # KeyError, EOFError, BadZipFile, zlib.error, NotImplementedError, tokenize.TokenError),
        # and a bad file must only cost a refit, so every Exception is caught here.
        except Exception as error:  # noqa: BLE001
            log.error("detector=%s state file %s is unreadable, refitting: %s: %s",
                      detector_name, path, type(error).__name__, error)
            return None
        if not isinstance(meta, dict):
            log.error("detector=%s state file %s has invalid metadata, refitting", detector_name, path)
            return None
        return arrays, meta

    def delete(self, detector_name: str) -> None:
        path = self.path(detector_name)
        if path is not None:
            path.unlink(missing_ok=True)


def _read_archive(path: Path) -> tuple[dict[str, np.ndarray], object]:
    archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError("not an .npz archive")
    with archive:
        arrays = {name: archive[name] for name in archive.files}
    for name, value in arrays.items():
        # NpzFile returns the raw bytes of a zip member that is not in .npy format.
        if not isinstance(value, np.ndarray):
            raise ValueError(f"member {name!r} is not a numpy array")
    meta = json.loads(arrays.pop(_META_KEY).tobytes().decode("utf-8"))
    return arrays, meta
