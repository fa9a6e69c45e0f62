"""Sharding: which exporter replica owns which entities.

N replicas (shards) run the same configuration. Shard k of N keeps the series whose entity
hashes to k modulo N, so each entity is fitted, scored and exposed by exactly one shard, and
all input series of one entity stay together. The hash is SHA-256 of the entity's label names
and values, so every process, Python version and machine agrees on it (Python's ``hash()`` is
salted per process).

The shard comes from ``--shard-index`` and ``--shard-count``, else from the environment
variables below. In a StatefulSet the index can be left out: it is then the pod ordinal at the
end of the pod name, which Kubernetes puts in ``HOSTNAME`` (``anomaly-exporter-3`` is shard 3).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

INDEX_VARIABLE = "ANOMALY_EXPORTER_SHARD_INDEX"
COUNT_VARIABLE = "ANOMALY_EXPORTER_SHARD_COUNT"
HOSTNAME_VARIABLE = "HOSTNAME"

# A StatefulSet names its pods <statefulset name>-<ordinal>.
_POD_ORDINAL = re.compile(r"^.+-(\d+)$")


class ShardError(ValueError):
    """The shard index or count is missing or invalid."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``. The default is the only shard, which owns every series."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ShardError(f"invalid shard count {self.count}: expected a whole number of at least 1")
        if not 0 <= self.index < self.count:
            raise ShardError(
                f"invalid shard index {self.index} for {self.count} shards: expected 0 to {self.count - 1}"
            )

    def owns(self, labels: Mapping[str, str], entity_labels: Sequence[str]) -> bool:
        """Tell whether this shard keeps the series with ``labels``."""
        if self.count == 1:
            return True
        return entity_shard(labels, entity_labels, self.count) == self.index


def entity_shard(labels: Mapping[str, str], entity_labels: Sequence[str], count: int) -> int:
    """Return the shard, from 0 to ``count - 1``, of the entity that ``labels`` belongs to.

    The entity is named by ``entity_labels``, or by every label when that list is empty, as in
    the ``entity`` output label. Label names are sorted first, so the order of
    ``entity_labels`` in the configuration does not move entities between shards.
    """
    names = sorted(entity_labels) if entity_labels else sorted(labels)
    # JSON keeps names and values apart, so ("a", "b=c") and ("a=b", "c") hash differently.
    document = json.dumps([[name, labels.get(name, "")] for name in names], ensure_ascii=False)
    digest = hashlib.sha256(document.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def _parse_whole_number(text: str, name: str, minimum: int) -> int:
    try:
        number = int(text.strip())
    except ValueError:
        raise ShardError(f"invalid {name} {text!r}: expected a whole number of at least {minimum}") from None
    if number < minimum:
        raise ShardError(f"invalid {name} {text!r}: expected a whole number of at least {minimum}")
    return number


def resolve_shard(index: int | None, count: int | None, environ: Mapping[str, str]) -> Shard:
    """Determine this process's shard from command-line values and the environment.

    ``index`` and ``count`` are the ``--shard-index`` and ``--shard-count`` values, None when
    not given. Each falls back to its environment variable. A missing count means 1. With more
    than one shard and no index, the index is the pod ordinal in ``HOSTNAME``.

    Raises ShardError when a value is invalid or the index cannot be determined.
    """
    if count is None and environ.get(COUNT_VARIABLE, "").strip():
        count = _parse_whole_number(environ[COUNT_VARIABLE], COUNT_VARIABLE, 1)
    if count is None:
        count = 1

    if index is None and environ.get(INDEX_VARIABLE, "").strip():
        index = _parse_whole_number(environ[INDEX_VARIABLE], INDEX_VARIABLE, 0)
    if index is None and count > 1:
        hostname = environ.get(HOSTNAME_VARIABLE, "")
        match = _POD_ORDINAL.match(hostname)
        if match is None:
            raise ShardError(
                f"shard index missing for {count} shards: set --shard-index or {INDEX_VARIABLE}, "
                f"or run in a StatefulSet, whose pod names end in -<ordinal> "
                f"({HOSTNAME_VARIABLE} is {hostname!r})"
            )
        index = int(match.group(1))
        if index >= count:
            raise ShardError(
                f"pod ordinal {index} in {HOSTNAME_VARIABLE} {hostname!r} is not below the shard count "
                f"{count}: set {COUNT_VARIABLE} to the StatefulSet's replica count"
            )
    if index is None:
        index = 0

    return Shard(index, count)
