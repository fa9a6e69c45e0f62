"""The exporter's YAML configuration, validated with pydantic.

Every user error becomes a ConfigError whose lines name the key path, the bad value and
the expected form, so the CLI can print them and exit with status 2.
"""

import difflib
import hashlib
import json
import re
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from detectors import detector_class, detector_type_names, is_multi_query, params_model
from exporter.durations import format_duration, parse_duration

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
DETECTOR_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_:-]*$")

# Largest fit_window / step: 366 days at 1 minute. A fit keeps a few float arrays of this
# length per series, so more would exhaust memory long before it improved a baseline.
MAX_FIT_POINTS = 527_040

# Maximum fit_every or score_every the scheduler accepts.
MAX_INTERVAL_SECONDS = 366 * 86400.0

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


def key_problems(problems: list[tuple[tuple, str]]) -> PydanticCustomError:
    """Return one validation error that parse_config reports as a line per (key path, message) pair.

    Key paths are relative to the location of the failing field or model.
    """
    summary = "; ".join(f"{'.'.join(map(str, path))}: {message}" if path else message for path, message in problems)
    return PydanticCustomError("key_problems", "{summary}", {"summary": summary, "problems": problems})


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a Prometheus duration such as 30s, 5m or 1h")
    if isinstance(value, (int, float)):
        raise ValueError(
            f"a bare number is ambiguous: write a Prometheus duration with a unit, such as {value}s or {value}m"
        )
    return parse_duration(value)


Duration = Annotated[float, BeforeValidator(_seconds)]


def _single_query(value: Any) -> Any:
    if isinstance(value, dict):
        raise ValueError("query takes one PromQL expression; to name several (tenant or equipment types), "
                         "write them under queries instead")
    return value


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


class CsvConfig(_Strict):
    """CSV files read instead of a query API, for ``anomaly-exporter backtest`` only."""

    path: str = Field(min_length=1)
    timestamp_column: str = "timestamp"
    separator: str = ","
    exclude_columns: list[str] = []


class SourceConfig(_Strict):
    url: str | None = None
    csv: CsvConfig | None = None
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
    def _http_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        expected = "expected an http:// or https:// URL of the query API, such as http://prometheus:9090"
        try:
            parts = urlsplit(url)
            _ = parts.port  # the property raises ValueError for a port that is not a number from 0 to 65535
        except ValueError:
            raise ValueError(expected) from None
        if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
            raise ValueError(expected)
        # The source logs its URL on every failed request, so a password in it would end up in the logs.
        if parts.username is not None or parts.password is not None:
            raise ValueError("credentials in the URL would be logged: use basic_auth or bearer_token_file instead")
        return url.rstrip("/")

    @field_validator("timeout")
    @classmethod
    def _positive_timeout(cls, seconds: float) -> float:
        if seconds <= 0 or seconds > 3600:
            raise ValueError("expected a positive duration of at most 1h, such as 30s")
        return seconds

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
        if (self.url is None) == (self.csv is None):
            raise ValueError("set either url (a query API) or csv (files for backtests), not both or neither")
        return self


class DetectorConfig(_Strict):
    name: str
    query: Annotated[str | None, BeforeValidator(_single_query)] = Field(default=None, min_length=1)
    queries: dict[str, str] = {}
    entity_labels: list[str] = []
    type: str
    params: dict[str, Any] = {}
    timezone: str = "UTC"
    direction: Literal["both", "up", "down"] = "both"
    labels: dict[str, str] = {}
    # step comes before fit_window so that the fit_window check can read the validated step.
    step: Duration = 60.0
    fit_window: Duration = 14 * 86400.0
    fit_every: Duration = 3600.0
    score_every: Duration = 60.0
    stale_after: Duration | None = None
    max_series: int = Field(default=10000, ge=1)
    counter: bool = False

    @field_validator("name")
    @classmethod
    def _name_form(cls, name: str) -> str:
        if not DETECTOR_NAME.match(name):
            raise ValueError(f"invalid detector name {name!r}: use letters, digits, _ , : or -, starting with a letter or _")
        return name

    @field_validator("queries", mode="before")
    @classmethod
    def _query_mapping(cls, queries: Any) -> Any:
        """Check the names and PromQL strings of ``queries`` and report every bad entry at its key."""
        if queries is None:
            return {}  # an empty ``queries:`` in YAML; the type then reports the missing keys
        if not isinstance(queries, dict):
            raise ValueError(
                "expected a mapping of query names to PromQL, such as "
                "{cpu: 'sum by (namespace) (rate(container_cpu_usage_seconds_total[5m]))'}"
            )
        problems = []
        for key, query in queries.items():
            if not isinstance(key, str):
                problems.append(((str(key),), f"query name {key!r} is not a string: YAML reads "
                                 "unquoted true, false, on, off, yes, no, null and numbers as such, so quote the name"))
            elif not LABEL_NAME.match(key):
                problems.append(((key,), f"invalid query name {key!r}: expected letters, digits and _, not starting "
                                 "with a digit"))
            elif not isinstance(query, str):
                problems.append(((key,), f"query {key!r} is {query!r}, not a string: expected a PromQL expression "
                                 "(quote it in YAML when it starts with [ or { or contains ': ' or ' #')"))
            elif not query.strip():
                problems.append(((key,), f"query {key!r} is empty: expected a PromQL expression"))
        if problems:
            raise key_problems(problems)
        return queries

    @model_validator(mode="after")
    def _query_form(self):
        if self.type not in detector_type_names():
            return self  # the type error is reported on its own
        if is_multi_query(self.type):
            problems = self._multi_query_problems()
            if problems:
                raise key_problems(problems)
        elif self.query is None and not self.queries:
            # parse_config reports this one as the missing key detectors[i].query.
            raise PydanticCustomError("missing_query", "required key is missing")
        elif self.queries:
            raise ValueError(f"type {self.type!r} reads one query: set query (a PromQL expression), not queries")
        return self

    def _multi_query_problems(self) -> list[tuple[tuple, str]]:
        """Return the problems of a tenant or equipment detector, each with its key path below the detector."""
        detector_type = detector_class(self.type)
        problems = []

        if self.query is not None:
            problems.append((("query",), f"type {self.type!r} reads several queries: move the PromQL into queries "
                             "(a mapping of names to PromQL) and remove query"))
        if not self.entity_labels:
            example = "[namespace]" if self.type == "tenant" else "[equipment]"
            problems.append((("entity_labels",), f"type {self.type!r} needs entity_labels, the labels that name each "
                             f"{self.type}, such as {example}"))
        if self.counter:
            problems.append((("counter",), f"counter is not supported by type {self.type!r}: remove it and wrap "
                             "each counter query in rate()"))
        if self.type == "tenant" and self.direction != "both":
            problems.append((("direction",), "direction must be 'both' for the tenant type: remove it and set a "
                             "side per metric in params.directions"))

        type_labels = detector_type.output_labels
        for name in self.entity_labels:
            if name in type_labels:
                problems.append((("entity_labels",), f"label {name!r} is set by type {self.type!r} on some of its "
                                 "series: rename it in the queries (label_replace) and in entity_labels"))
        for name in self.labels:
            if name in type_labels:
                problems.append((("labels", name), f"label {name!r} is set by type {self.type!r} on some of its "
                                 "series: choose another static label name"))
            elif name in self.entity_labels:
                problems.append((("labels", name), f"static label {name!r} would replace the entity label of every "
                                 "series, so all of them would name one entity: choose another name"))

        try:
            params = self.typed_params()
        except ValidationError:
            return problems  # parse_config reports params errors with their key paths
        return problems + detector_type.check_settings(
            list(self.queries), params, entity_labels=self.entity_labels, step=self.step, fit_window=self.fit_window
        )

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

    @field_validator("step")
    @classmethod
    def _whole_seconds(cls, step: float) -> float:
        if step < 1 or step != int(step):
            raise ValueError("expected a whole number of seconds, at least 1s")
        return step

    @field_validator("fit_window")
    @classmethod
    def _ten_steps(cls, window: float, info: ValidationInfo) -> float:
        step = info.data.get("step")  # missing when step itself is invalid
        if step is not None and window < 10 * step:
            raise ValueError(
                f"fit_window must cover at least 10 steps: at least {format_duration(10 * step)} "
                f"with step {format_duration(step)}"
            )
        if step is not None and window / step > MAX_FIT_POINTS:
            raise ValueError(
                f"fit_window of {format_duration(window)} at step {format_duration(step)} is "
                f"{window / step:,.0f} points per series, more than {MAX_FIT_POINTS:,}: "
                "use a longer step or a shorter fit_window"
            )
        return window

    @field_validator("fit_every", "score_every")
    @classmethod
    def _at_least_one_second(cls, seconds: float) -> float:
        if seconds < 1:
            raise ValueError("expected a duration of at least 1s")
        if seconds > MAX_INTERVAL_SECONDS:
            raise ValueError(f"expected a duration of at most {format_duration(MAX_INTERVAL_SECONDS)}")
        return seconds

    @field_validator("stale_after")
    @classmethod
    def _positive_stale_after(cls, seconds: float | None) -> float | None:
        if seconds is not None and seconds <= 0:
            raise ValueError("expected a positive duration such as 10m")
        return seconds

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
            "queries": self.queries,
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

    @field_validator("state_dir")
    @classmethod
    def _folder(cls, path: Path | None) -> Path | None:
        if path is not None and path.exists() and not path.is_dir():
            raise ValueError(f"{str(path)!r} exists but is not a folder")
        return path

    @model_validator(mode="after")
    def _unique_names(self):
        # parse_config reports duplicates with their key paths and drops this error type.
        seen = set()
        for detector in self.detectors:
            if detector.name in seen:
                raise PydanticCustomError(
                    "duplicate_detector_name", "detector names must be unique", {"name": detector.name}
                )
            seen.add(detector.name)
        return self


def split_listen_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``:port`` means every interface)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid listen address {address!r}: expected host:port such as 0.0.0.0:9847 or 127.0.0.1:9847")
    return (host.strip("[]") or "0.0.0.0", int(port))


def _clean_location(location: tuple) -> tuple:
    """Drop the validator steps pydantic puts in an error location, keeping keys and list indexes."""
    return tuple(
        part for part in location
        if isinstance(part, int) or not (part in ("function-after", "function-before") or "[" in str(part))
    )


def _key_path(location: tuple) -> str:
    path = ""
    for part in _clean_location(location):
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def _nested_model(annotation) -> type[BaseModel] | None:
    """Find the model class in an annotation such as ``TLSConfig``, ``BasicAuth | None`` or ``list[DetectorConfig]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):
        found = _nested_model(argument)
        if found is not None:
            return found
    return None


def _unknown_key(location: tuple, root: type[BaseModel]) -> str:
    """Describe an unknown key with the closest valid key and the list of valid keys at its level."""
    model = root
    for part in location[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _nested_model(field.annotation) if field is not None else None
        if model is None:
            return "unknown key; check its spelling"
    valid = sorted(model.model_fields)
    close = difflib.get_close_matches(str(location[-1]), valid, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}? Valid keys here: {', '.join(valid)}"
    return f"unknown key; valid keys here: {', '.join(valid)}"


def _describe_all(error: dict, detectors: list, prefix: tuple = (), root: type[BaseModel] | None = None) -> list[str]:
    """Turn one pydantic error into its lines; a ``key_problems`` error has one line per key."""
    if error["type"] != "key_problems":
        return [_describe(error, detectors, prefix, root)]
    location = tuple(prefix) + tuple(error["loc"])
    return [f"{_path_with_name(location + tuple(path), detectors)}: {message}" for path, message in error["ctx"]["problems"]]


def _path_with_name(location: tuple, detectors: list) -> str:
    """Return the key path of ``location``, followed by the detector's name where it has one."""
    path = _key_path(location)
    if location[:1] == ("detectors",) and len(location) > 1 and isinstance(location[1], int):
        index = location[1]
        if index < len(detectors) and isinstance(detectors[index], dict) and "name" in detectors[index]:
            path += f" (detector {detectors[index]['name']!r})"
    return path


def _describe(error: dict, detectors: list, prefix: tuple = (), root: type[BaseModel] | None = None) -> str:
    """Turn one pydantic error into a line; ``prefix`` is the path of ``root`` inside the file."""
    root = root or Config
    location = tuple(prefix) + tuple(error["loc"])
    if error["type"] == "missing_query":
        location += ("query",)
    path = _path_with_name(location, detectors)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{path}: {_unknown_key(_clean_location(tuple(error['loc'])), root)}"
    if error["type"] in ("missing", "missing_query"):
        return f"{path}: required key is missing"
    value = error.get("input")
    # Skip the "got" part when the message already quotes the value or the value is a whole block.
    if isinstance(value, (dict, list)) or (isinstance(value, str) and repr(value) in message):
        return f"{path}: {message}"
    return f"{path}: {message} (got {value!r})"


def _duplicate_names(detectors: list) -> list[str]:
    """Describe every detector whose name an earlier detector already uses."""
    first_index: dict[str, int] = {}
    problems = []
    for index, detector in enumerate(detectors):
        name = detector.get("name") if isinstance(detector, dict) else None
        if not isinstance(name, str):
            continue
        if name in first_index:
            problems.append(
                f"detectors[{index}].name (detector {name!r}): name already used by "
                f"detectors[{first_index[name]}]; detector names must be unique"
            )
        else:
            first_index[name] = index
    return problems


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate an already parsed YAML document, including each detector's params."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping with the keys source and detectors"])
    detectors = data.get("detectors") if isinstance(data.get("detectors"), list) else []
    duplicates = _duplicate_names(detectors)
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        problems = [line for e in error.errors() if e["type"] != "duplicate_detector_name"
                    for line in _describe_all(e, detectors)]
        raise ConfigError(source, problems + duplicates) from None

    problems = []
    for index, detector in enumerate(config.detectors):
        try:
            detector.typed_params()
        except ValidationError as error:
            root = params_model(detector.type)
            for e in error.errors():
                problems.append(_describe(e, detectors, prefix=("detectors", index, "params"), root=root))
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
    except UnicodeDecodeError as error:
        raise ConfigError(str(path), [f"the file is not UTF-8 text: invalid byte at offset {error.start}"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(str(path), [f"{where}invalid YAML: {problem}"]) from None
    if data is None:
        raise ConfigError(str(path), ["the file is empty: expected a mapping with the keys source and detectors"])
    if isinstance(data, dict):
        _resolve_paths(data, path.parent)
    return parse_config(data, str(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that rejects a key repeated in one mapping instead of keeping the last value."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys merged in with << may be overridden, as YAML allows
        key = loader.construct_object(key_node, deep=deep)
        try:
            repeated = key in seen
            seen.add(key)
        except TypeError:
            continue  # construct_mapping reports an unhashable key itself
        if repeated:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _resolve_paths(data: dict, base: Path) -> None:
    """Make relative file paths relative to the configuration file's folder, as Prometheus does."""

    def resolve(mapping, key):
        if isinstance(mapping, dict) and isinstance(mapping.get(key), str) and mapping[key]:
            candidate = Path(mapping[key])
            if not candidate.is_absolute():
                mapping[key] = str(base / candidate)

    source = data.get("source")
    if isinstance(source, dict):
        resolve(source.get("csv"), "path")
        resolve(source, "bearer_token_file")
        resolve(source.get("basic_auth"), "password_file")
        for key in ("ca_file", "cert_file", "key_file"):
            resolve(source.get("tls"), key)
    resolve(data, "state_dir")


def require_query_api(config: Config, source: str) -> Config:
    """Raise ConfigError unless the configuration reads a query API, as ``run`` needs."""
    if config.source.url is None:
        raise ConfigError(source, ["source.csv: CSV files serve backtests only; set source.url to run the exporter"])
    return config
