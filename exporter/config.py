"""The exporter's YAML configuration, validated with pydantic.

Every user error becomes a ConfigError whose lines name the key path, the bad value and
the expected form, so the CLI can print them and exit with status 2.
"""

import hashlib
import json
import re
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from detectors import detector_type_names, params_model
from exporter.durations import parse_duration

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
DETECTOR_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_:-]*$")

# Labels the exporter adds to every anomaly series; an input or static label may not use them.
RESERVED_LABELS = ("detector", "entity")

# The default port is unassigned in the Prometheus default port allocations wiki page.
DEFAULT_LISTEN_ADDRESS = "0.0.0.0:9847"


class ConfigError(Exception):
    """A configuration that cannot be used; each line of ``problems`` names one key."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"invalid configuration in {source}:\n" + "\n".join(f"  {p}" for p in problems))


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a Prometheus duration such as 30s, 5m or 1h")
    if isinstance(value, (int, float)):
        raise ValueError(
            f"a bare number is ambiguous: write a Prometheus duration with a unit, such as {value}s or {value}m"
        )
    return parse_duration(value)


Duration = Annotated[float, BeforeValidator(_seconds)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(_Strict):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure_skip_verify: bool = False

    @model_validator(mode="after")
    def _check_pair(self):
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together for a client certificate")
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path is not None and not path.is_file():
                raise ValueError(f"file {str(path)!r} not found")
        return self


class BasicAuth(_Strict):
    username: str = Field(min_length=1)
    password_file: Path

    @field_validator("password_file")
    @classmethod
    def _readable(cls, path: Path) -> Path:
        if not path.is_file():
            raise ValueError(f"file {str(path)!r} not found")
        return path


class SourceConfig(_Strict):
    url: str
    timeout: Duration = 30.0
    bearer_token_file: Path | None = None
    basic_auth: BasicAuth | None = None
    tls: TLSConfig = TLSConfig()
    headers: dict[str, str] = {}
    max_concurrent_queries: int = Field(default=4, ge=1, le=256)
    query_delay: Duration = 30.0
    max_retries: int = Field(default=3, ge=0, le=20)
    max_points_per_query: int = Field(default=10000, ge=100, le=11000)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"expected an http:// or https:// URL of the query API, got {url!r}")
        return url.rstrip("/")

    @field_validator("bearer_token_file")
    @classmethod
    def _token_readable(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"file {str(path)!r} not found")
        return path

    @model_validator(mode="after")
    def _one_auth(self):
        if self.bearer_token_file is not None and self.basic_auth is not None:
            raise ValueError("set either bearer_token_file or basic_auth, not both")
        return self


class DetectorConfig(_Strict):
    name: str
    query: str = Field(min_length=1)
    entity_labels: list[str] = []
    type: str
    params: dict[str, Any] = {}
    timezone: str = "UTC"
    direction: Literal["both", "up", "down"] = "both"
    labels: dict[str, str] = {}
    fit_window: Duration = 14 * 86400.0
    fit_every: Duration = 3600.0
    score_every: Duration = 60.0
    step: Duration = 60.0
    stale_after: Duration | None = None
    max_series: int = Field(default=10000, ge=1)
    counter: bool = False

    @field_validator("name")
    @classmethod
    def _name_form(cls, name: str) -> str:
        if not DETECTOR_NAME.match(name):
            raise ValueError(f"invalid detector name {name!r}: use letters, digits, _ , : or -, starting with a letter")
        return name

    @field_validator("entity_labels")
    @classmethod
    def _entity_label_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not LABEL_NAME.match(name):
                raise ValueError(f"invalid label name {name!r}: expected [a-zA-Z_][a-zA-Z0-9_]*")
            if name in RESERVED_LABELS:
                raise ValueError(f"label {name!r} is added by the exporter and cannot name an entity")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate label in {names}")
        return names

    @field_validator("labels")
    @classmethod
    def _static_label_names(cls, labels: dict[str, str]) -> dict[str, str]:
        for name in labels:
            if not LABEL_NAME.match(name) or name.startswith("__"):
                raise ValueError(f"invalid label name {name!r}: expected [a-zA-Z_][a-zA-Z0-9_]* without a leading __")
            if name in RESERVED_LABELS:
                raise ValueError(f"label {name!r} is added by the exporter; choose another static label name")
        return labels

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {name!r}: expected an IANA name such as UTC or Europe/Berlin") from None
        return name

    @field_validator("type")
    @classmethod
    def _known_type(cls, name: str) -> str:
        if name not in detector_type_names():
            raise ValueError(f"unknown detector type {name!r}: expected one of {', '.join(detector_type_names())}")
        return name

    @model_validator(mode="after")
    def _check_timing(self):
        if self.step < 1 or self.step != int(self.step):
            raise ValueError(f"step must be a whole number of seconds, at least 1s (got {self.step:g}s)")
        if self.fit_window < 10 * self.step:
            raise ValueError(f"fit_window must cover at least 10 steps ({10 * self.step:g}s)")
        if self.score_every < 1:
            raise ValueError("score_every must be at least 1s")
        return self

    @property
    def stale_seconds(self) -> float:
        """How old the newest sample may be before the series counts as stale."""
        if self.stale_after is not None:
            return self.stale_after
        return max(300.0, 2 * self.step)

    def typed_params(self):
        """Validate ``params`` with the detector type's own model."""
        return params_model(self.type).model_validate(self.params)

    def fingerprint(self) -> str:
        """Hash of everything that changes a fitted model; saved state with another hash is refitted."""
        relevant = {
            "type": self.type,
            "query": self.query,
            "params": self.typed_params().model_dump(mode="json"),
            "timezone": self.timezone,
            "direction": self.direction,
            "step": self.step,
            "counter": self.counter,
            "entity_labels": self.entity_labels,
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class Config(_Strict):
    source: SourceConfig
    listen_address: str = DEFAULT_LISTEN_ADDRESS
    state_dir: Path | None = None
    detectors: list[DetectorConfig] = Field(min_length=1)

    @field_validator("listen_address")
    @classmethod
    def _host_port(cls, address: str) -> str:
        split_listen_address(address)
        return address

    @model_validator(mode="after")
    def _unique_names(self):
        seen = set()
        for detector in self.detectors:
            if detector.name in seen:
                raise ValueError(f"detector name {detector.name!r} is used twice; names must be unique")
            seen.add(detector.name)
        return self


def split_listen_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``:port`` means every interface)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid listen address {address!r}: expected host:port such as 0.0.0.0:9847 or 127.0.0.1:9847")
    return (host.strip("[]") or "0.0.0.0", int(port))


def _key_path(location: tuple) -> str:
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("function-after", "function-before") or "[" in str(part):
            continue
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def _describe(error: dict, detectors: list) -> str:
    location = list(error["loc"])
    path = _key_path(tuple(location))
    if location[:1] == ["detectors"] and len(location) > 1 and isinstance(location[1], int):
        index = location[1]
        if index < len(detectors) and isinstance(detectors[index], dict) and "name" in detectors[index]:
            path += f" (detector {detectors[index]['name']!r})"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key; check its spelling against docs/configuration.md"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    value = error.get("input")
    if isinstance(value, (dict, list)):
        return f"{path}: {message}"
    return f"{path}: {message} (got {value!r})"


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate an already parsed YAML document, including each detector's params."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping with the keys source and detectors"])
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        detectors = data.get("detectors") if isinstance(data.get("detectors"), list) else []
        raise ConfigError(source, [_describe(e, detectors) for e in error.errors()]) from None

    problems = []
    for index, detector in enumerate(config.detectors):
        try:
            detector.typed_params()
        except ValidationError as error:
            for e in error.errors():
                e = dict(e, loc=("detectors", index, "params", *e["loc"]))
                problems.append(_describe(e, data["detectors"]))
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML configuration file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(str(path), [f"cannot read the file: {error.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(str(path), [f"{where}invalid YAML: {problem}"]) from None
    if isinstance(data, dict):
        _resolve_paths(data, path.parent)
    return parse_config(data, str(path))


def _resolve_paths(data: dict, base: Path) -> None:
    """Make relative file paths relative to the configuration file's folder, as Prometheus does."""

    def resolve(mapping, key):
        if isinstance(mapping, dict) and isinstance(mapping.get(key), str) and mapping[key]:
            candidate = Path(mapping[key])
            if not candidate.is_absolute():
                mapping[key] = str(base / candidate)

    source = data.get("source")
    if isinstance(source, dict):
        resolve(source, "bearer_token_file")
        resolve(source.get("basic_auth"), "password_file")
        for key in ("ca_file", "cert_file", "key_file"):
            resolve(source.get("tls"), key)
    resolve(data, "state_dir")
