"""Fitted model state on disk: one ``.npz`` file per detector, written atomically, never pickled.

A file holds the detector's numeric arrays plus a JSON document (the detector's metadata,
the configuration fingerprint and the label sets of the fitted series) stored as bytes.
Files are loaded with ``allow_pickle=False``, so a tampered file cannot run code.
"""

import io
import json
import logging
import os
import tempfile
import zipfile
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
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files if name != _META_KEY}
                meta = json.loads(archive[_META_KEY].tobytes().decode("utf-8"))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, io.UnsupportedOperation) as error:
            log.error("detector=%s state file %s is unreadable, refitting: %s", detector_name, path, error)
            return None
        if not isinstance(meta, dict):
            log.error("detector=%s state file %s has invalid metadata, refitting", detector_name, path)
            return None
        return arrays, meta

    def delete(self, detector_name: str) -> None:
        path = self.path(detector_name)
        if path is not None:
            path.unlink(missing_ok=True)
