"""Loading and validating the YAML configuration, and the duration syntax it uses."""

from pathlib import Path

import pytest
import yaml

from exporter.config import ConfigError, load_config, parse_config
from exporter.durations import format_duration, parse_duration

# Marks a key that a case removes from the base configuration.
REMOVE = object()


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def minimal() -> dict:
    return {
        "source": {"url": "http://127.0.0.1:9090"},
        "detectors": [{"name": "x", "query": "up", "type": "seasonal"}],
    }


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


def line_for(problems: list[str], key_path: str) -> str | None:
    return next((line for line in problems if line.startswith(key_path)), None)


# Full configuration --------------------------------------------------------------------


@pytest.fixture
def full_config(tmp_path) -> Path:
    folder = tmp_path / "etc"
    (folder / "secrets").mkdir(parents=True)
    (folder / "secrets" / "password").write_text("hunter2\n")
    for name in ("ca.pem", "client.pem", "client.key"):
        (folder / name).write_text("not checked at load time\n")
    data = {
        "source": {
            "url": "https://prometheus.example:9090/select/",
            "timeout": "45s",
            "basic_auth": {"username": "reader", "password_file": "secrets/password"},
            "tls": {"ca_file": "ca.pem", "cert_file": "client.pem", "key_file": "client.key"},
            "headers": {"X-Scope-OrgID": "tenant-a"},
            "max_concurrent_queries": 2,
            "query_delay": "1m30s",
            "max_retries": 5,
            "max_points_per_query": 5000,
        },
        "listen_address": "127.0.0.1:9999",
        "state_dir": "state",
        "detectors": [
            {
                "name": "cpu",
                "query": "sum by (instance) (rate(node_cpu_seconds_total[5m]))",
                "entity_labels": ["instance"],
                "type": "seasonal",
                "params": {
                    "seasonality": "daily",
                    "band_sigmas": 4,
                    "bucket": "15m",
                    "min_history": "2d",
                    "level_halflife": "3h",
                    "min_seasonal_strength": 0.3,
                    "min_spread_ratio": 0.05,
                    "min_spread": 0.5,
                },
                "timezone": "Europe/Berlin",
                "direction": "up",
                "labels": {"team": "infra"},
                "fit_window": "7d",
                "fit_every": "30m",
                "score_every": "30s",
                "step": "1m",
                "stale_after": "10m",
                "max_series": 50,
                "counter": True,
            },
            {"name": "mem", "query": "node_memory_Active_bytes", "type": "seasonal"},
        ],
    }
    return write(folder / "exporter.yml", data)


def test_full_source_values(full_config):
    source = load_config(full_config).source
    folder = full_config.parent

    assert source.url == "https://prometheus.example:9090/select"
    assert source.timeout == 45.0
    assert source.basic_auth.username == "reader"
    assert source.basic_auth.password_file == folder / "secrets" / "password"
    assert source.tls.ca_file == folder / "ca.pem"
    assert source.tls.cert_file == folder / "client.pem"
    assert source.tls.key_file == folder / "client.key"
    assert source.tls.insecure_skip_verify is False
    assert source.headers == {"X-Scope-OrgID": "tenant-a"}
    assert source.max_concurrent_queries == 2
    assert source.query_delay == 90.0
    assert source.max_retries == 5
    assert source.max_points_per_query == 5000


def test_full_detector_values(full_config):
    config = load_config(full_config)
    detector = config.detectors[0]
    params = detector.typed_params()

    assert config.listen_address == "127.0.0.1:9999"
    assert config.state_dir == full_config.parent / "state"
    assert [d.name for d in config.detectors] == ["cpu", "mem"]
    assert detector.query == "sum by (instance) (rate(node_cpu_seconds_total[5m]))"
    assert detector.entity_labels == ["instance"]
    assert detector.timezone == "Europe/Berlin"
    assert detector.direction == "up"
    assert detector.labels == {"team": "infra"}
    assert detector.fit_window == 7 * 86400.0
    assert detector.fit_every == 1800.0
    assert detector.score_every == 30.0
    assert detector.step == 60.0
    assert detector.stale_after == 600.0
    assert detector.stale_seconds == 600.0
    assert detector.max_series == 50
    assert detector.counter is True
    assert params.seasonality == "daily"
    assert params.band_sigmas == 4.0
    assert params.bucket == "15m"
    assert params.min_history == "2d"
    assert params.level_halflife == "3h"
    assert params.min_seasonal_strength == 0.3
    assert params.min_spread_ratio == 0.05
    assert params.min_spread == 0.5


def test_bearer_token_file_resolved(tmp_path):
    (tmp_path / "token").write_text("abc\n")
    data = minimal()
    data["source"]["bearer_token_file"] = "token"

    source = load_config(write(tmp_path / "c.yml", data)).source

    assert source.bearer_token_file == tmp_path / "token"


def test_paths_resolve_against_config_folder(full_config, tmp_path, monkeypatch):
    # Loading from another working directory must not change where relative paths point.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(Path("..") / "etc" / "exporter.yml")

    folder = full_config.parent.resolve()
    assert config.source.basic_auth.password_file.resolve() == folder / "secrets" / "password"
    assert config.state_dir.resolve() == folder / "state"


def test_absolute_paths_kept(tmp_path):
    token = tmp_path / "secrets" / "token"
    token.parent.mkdir()
    token.write_text("abc\n")
    data = minimal()
    data["source"]["bearer_token_file"] = str(token)
    config_folder = tmp_path / "conf"
    config_folder.mkdir()

    source = load_config(write(config_folder / "c.yml", data)).source

    assert source.bearer_token_file == token


def test_minimal_defaults(tmp_path):
    config = load_config(write(tmp_path / "c.yml", minimal()))
    source = config.source
    detector = config.detectors[0]
    params = detector.typed_params()

    assert config.listen_address == "0.0.0.0:9847"
    assert config.state_dir is None
    assert source.timeout == 30.0
    assert source.query_delay == 30.0
    assert source.bearer_token_file is None
    assert source.basic_auth is None
    assert source.tls.ca_file is None
    assert source.headers == {}
    assert source.max_retries == 3
    assert detector.entity_labels == []
    assert detector.timezone == "UTC"
    assert detector.direction == "both"
    assert detector.labels == {}
    assert detector.step == 60.0
    assert detector.fit_window == 14 * 86400.0
    assert detector.fit_every == 3600.0
    assert detector.score_every == 60.0
    assert detector.stale_after is None
    assert detector.stale_seconds == 300.0
    assert detector.counter is False
    assert params.band_sigmas == 3.0
    assert params.seasonality == "auto"


def test_stale_default_follows_step(tmp_path):
    data = minimal()
    data["detectors"][0]["step"] = "5m"

    detector = load_config(write(tmp_path / "c.yml", data)).detectors[0]

    assert detector.stale_seconds == 600.0


def test_fingerprint_tracks_model_inputs():
    def fingerprint(**overrides):
        data = minimal()
        data["detectors"][0].update(overrides)
        return parse_config(data).detectors[0].fingerprint()

    base = fingerprint()

    assert fingerprint(params={"band_sigmas": 4}) != base
    assert fingerprint(step="5m", fit_window="14d") != base
    assert fingerprint(timezone="Asia/Tokyo") != base
    assert fingerprint(params={"band_sigmas": 3}) == base
    assert fingerprint(score_every="10s") == base
    assert fingerprint(labels={"team": "a"}) == base


# Invalid input: one table row per kind of mistake ------------------------------------------


def case(case_id, key_path, value, form, *, source=None, detector=None, top=None, extra=None):
    return pytest.param(source or {}, detector or {}, top or {}, extra or [], key_path, value, form, id=case_id)


INVALID = [
    case("duration words", "detectors[0].fit_window (detector 'x')", "'5 minutes'", "such as 30s",
         detector={"fit_window": "5 minutes"}),
    case("duration bare number", "detectors[0].step (detector 'x')", "300", "300s",
         detector={"step": 300}),
    case("duration unit twice", "detectors[0].score_every (detector 'x')", "'1h1h'", "Prometheus duration",
         detector={"score_every": "1h1h"}),
    case("duration units reversed", "detectors[0].fit_every (detector 'x')", "'30m1h'", "Prometheus duration",
         detector={"fit_every": "30m1h"}),
    case("duration boolean", "detectors[0].fit_every (detector 'x')", "True", "Prometheus duration",
         detector={"fit_every": True}),
    case("detector key typo", "detectors[0].fit_windwo (detector 'x')", "unknown key", "'fit_window'",
         detector={"fit_windwo": "7d"}),
    case("top key typo", "listen_adress", "unknown key", "'listen_address'",
         top={"listen_adress": "127.0.0.1:1"}),
    case("source key typo", "source.bearer_token", "unknown key", "bearer_token_file",
         source={"bearer_token": "abc"}),
    case("missing query", "detectors[0].query (detector 'x')", "missing", "required",
         detector={"query": REMOVE}),
    case("missing source", "source", "missing", "required",
         top={"source": REMOVE}),
    case("missing url", "source", "url (a query API)", "or neither",
         source={"url": REMOVE}),
    case("no detectors", "detectors", "at least 1", "List",
         top={"detectors": []}),
    case("unknown type", "detectors[0].type (detector 'x')", "'prophet'", "seasonal",
         detector={"type": "prophet"}),
    case("negative band_sigmas", "detectors[0].params.band_sigmas (detector 'x')", "-1", "greater than 0",
         detector={"params": {"band_sigmas": -1}}),
    case("bucket not dividing day", "detectors[0].params.bucket (detector 'x')", "'7m'", "divide one day",
         detector={"params": {"bucket": "7m"}}),
    case("unknown param", "detectors[0].params.sigmas (detector 'x')", "unknown key", "'band_sigmas'",
         detector={"params": {"sigmas": 2}}),
    case("invalid seasonality", "detectors[0].params.seasonality (detector 'x')", "'hourly'", "'daily'",
         detector={"params": {"seasonality": "hourly"}}),
    case("duplicate name", "detectors[1].name (detector 'x')", "detectors[0]", "unique",
         extra=[{"name": "x", "query": "up", "type": "seasonal"}]),
    case("reserved entity label", "detectors[0].entity_labels (detector 'x')", "'detector'", "added by the exporter",
         detector={"entity_labels": ["instance", "detector"]}),
    case("reserved static label", "detectors[0].labels (detector 'x')", "'entity'", "added by the exporter",
         detector={"labels": {"entity": "a"}}),
    case("invalid entity label", "detectors[0].entity_labels (detector 'x')", "'job-name'", "[a-zA-Z_]",
         detector={"entity_labels": ["job-name"]}),
    case("invalid static label", "detectors[0].labels (detector 'x')", "'__team'", "without a leading __",
         detector={"labels": {"__team": "a"}}),
    case("duplicate entity label", "detectors[0].entity_labels (detector 'x')", "'job'", "duplicate",
         detector={"entity_labels": ["job", "job"]}),
    case("invalid detector name", "detectors[0].name (detector '9lives')", "'9lives'", "starting with a letter",
         detector={"name": "9lives"}),
    case("unknown time zone", "detectors[0].timezone (detector 'x')", "'Mars/Olympus'", "IANA",
         detector={"timezone": "Mars/Olympus"}),
    case("invalid direction", "detectors[0].direction (detector 'x')", "'sideways'", "'both'",
         detector={"direction": "sideways"}),
    case("url without scheme", "source.url", "'localhost:9090'", "http://",
         source={"url": "localhost:9090"}),
    case("url other scheme", "source.url", "'ftp://host'", "http://",
         source={"url": "ftp://host"}),
    case("url broken ipv6", "source.url", "'http://[::1'", "http://",
         source={"url": "http://[::1"}),
    case("url invalid port", "source.url", "'http://host:port'", "http://",
         source={"url": "http://host:port"}),
    case("url with password", "source.url", "'http://user:pw@host'", "basic_auth",
         source={"url": "http://user:pw@host"}),
    case("cert without key", "source.tls", "cert_file", "key_file",
         source={"tls": {"cert_file": "client.pem"}}),
    case("missing token file", "source.bearer_token_file", "no-such-token", "not found",
         source={"bearer_token_file": "no-such-token"}),
    case("missing password file", "source.basic_auth.password_file", "no-such-password", "not found",
         source={"basic_auth": {"username": "u", "password_file": "no-such-password"}}),
    case("missing ca file", "source.tls", "no-such-ca.pem", "not found",
         source={"tls": {"ca_file": "no-such-ca.pem"}}),
    case("token and basic auth", "source", "bearer_token_file", "basic_auth",
         source={"bearer_token_file": "client.pem",
                 "basic_auth": {"username": "u", "password_file": "client.pem"}}),
    case("zero timeout", "source.timeout", "'0s'", "positive",
         source={"timeout": "0s"}),
    case("step fraction", "detectors[0].step (detector 'x')", "'1500ms'", "whole number of seconds",
         detector={"step": "1500ms"}),
    case("step below second", "detectors[0].step (detector 'x')", "'500ms'", "whole number of seconds",
         detector={"step": "500ms"}),
    case("fit_window under 10 steps", "detectors[0].fit_window (detector 'x')", "'9m'", "10 steps",
         detector={"step": "1m", "fit_window": "9m"}),
    case("zero fit_every", "detectors[0].fit_every (detector 'x')", "'0s'", "at least 1s",
         detector={"fit_every": "0s"}),
    case("zero score_every", "detectors[0].score_every (detector 'x')", "'0s'", "at least 1s",
         detector={"score_every": "0s"}),
    case("zero stale_after", "detectors[0].stale_after (detector 'x')", "'0s'", "positive",
         detector={"stale_after": "0s"}),
    case("zero max_series", "detectors[0].max_series (detector 'x')", "0", "greater than or equal to 1",
         detector={"max_series": 0}),
    case("listen without port", "listen_address", "'localhost'", "host:port",
         top={"listen_address": "localhost"}),
    case("listen port too big", "listen_address", "':70000'", "host:port",
         top={"listen_address": ":70000"}),
    case("listen port not number", "listen_address", "'127.0.0.1:http'", "host:port",
         top={"listen_address": "127.0.0.1:http"}),
    case("state_dir is a file", "state_dir", "client.pem", "not a folder",
         top={"state_dir": "client.pem"}),
]


@pytest.mark.parametrize("source, detector, top, extra, key_path, value, form", INVALID)
def test_invalid_config(tmp_path, source, detector, top, extra, key_path, value, form):
    (tmp_path / "client.pem").write_text("present\n")
    data = minimal()
    for target, changes in ((data["source"], source), (data["detectors"][0], detector), (data, top)):
        for key, new_value in changes.items():
            if new_value is REMOVE:
                del target[key]
            else:
                target[key] = new_value
    if "detectors" in data:
        data["detectors"].extend(extra)

    problems = problems_of(write(tmp_path / "c.yml", data))
    line = line_for(problems, key_path)

    assert line is not None, problems
    assert value in line
    assert form in line


def test_invalid_lists_every_problem(tmp_path):
    data = minimal()
    data["detectors"][0].update(fit_window="5 minutes", timezone="Nowhere/City")
    data["detectors"].append({"name": "y", "query": "up", "type": "prophet"})

    problems = problems_of(write(tmp_path / "c.yml", data))

    assert line_for(problems, "detectors[0].fit_window") is not None
    assert line_for(problems, "detectors[0].timezone") is not None
    assert line_for(problems, "detectors[1].type") is not None


def test_error_message_names_file(tmp_path):
    data = minimal()
    data["detectors"][0]["step"] = "soon"
    path = write(tmp_path / "c.yml", data)

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(path) in str(caught.value)


# Files that are not a usable YAML mapping ---------------------------------------------------


def test_invalid_yaml_line(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(
        "source:\n"
        "  url: http://127.0.0.1:9090\n"
        "detectors:\n"
        "  - name: x\n"
        "    query: up\n"
        "   type: seasonal\n"
    )

    problems = problems_of(path)

    assert len(problems) == 1
    assert problems[0].startswith("line 6,")
    assert "invalid YAML" in problems[0]


def test_duplicate_yaml_key(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(
        "source:\n"
        "  url: http://127.0.0.1:9090\n"
        "detectors:\n"
        "  - name: x\n"
        "    query: up\n"
        "    type: seasonal\n"
        "    step: 1m\n"
        "    step: 5m\n"
    )

    problems = problems_of(path)

    assert problems[0].startswith("line 8,")
    assert "duplicate key 'step'" in problems[0]


def test_yaml_merge_key_override(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(
        "source:\n"
        "  url: http://127.0.0.1:9090\n"
        "detectors:\n"
        "  - &base {name: x, query: up, type: seasonal, step: 1m}\n"
        "  - <<: *base\n"
        "    name: y\n"
        "    step: 5m\n"
    )

    config = load_config(path)

    assert config.detectors[1].step == 300.0
    assert config.detectors[1].query == "up"


def test_python_tag_rejected(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("source: !!python/object/apply:os.getcwd []\n")

    problems = problems_of(path)

    assert "invalid YAML" in problems[0]


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("# only a comment\n", "empty", id="comment only"),
        pytest.param("- source\n- detectors\n", "expected a mapping", id="list"),
        pytest.param("just a string\n", "expected a mapping", id="scalar"),
    ],
)
def test_not_a_mapping(tmp_path, text, expected):
    path = tmp_path / "c.yml"
    path.write_text(text)

    problems = problems_of(path)

    assert len(problems) == 1
    assert expected in problems[0]


def test_not_utf8(tmp_path):
    path = tmp_path / "c.yml"
    path.write_bytes(b"source:\n  url: http://caf\xe9:9090\n")

    problems = problems_of(path)

    assert "not UTF-8" in problems[0]


def test_missing_file(tmp_path):
    problems = problems_of(tmp_path / "absent.yml")

    assert "cannot read the file" in problems[0]


def test_detector_not_mapping():
    with pytest.raises(ConfigError) as caught:
        parse_config({"source": {"url": "http://127.0.0.1:9090"}, "detectors": ["x"]})

    assert line_for(caught.value.problems, "detectors[0]") is not None


# Durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("14d", 14 * 86400.0),
        ("2w", 14 * 86400.0),
        ("1y", 365 * 86400.0),
        ("250ms", 0.25),
        ("1m30s500ms", 90.5),
        ("0s", 0.0),
        (" 5m ", 300.0),
    ],
)
def test_duration_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["5 minutes", "300", "1h1h", "30m1h", "1.5h", "", "m", "-5m", "5M", "5min", "1d 2h", None, 300]
)
def test_duration_rejected(text):
    with pytest.raises(ValueError, match="expected a Prometheus duration"):
        parse_duration(text)


@pytest.mark.parametrize("seconds", [0.5, 1.0, 59.0, 90.0, 3600.0, 5400.0, 86400.0, 15 * 86400.0, 400 * 86400.0])
def test_duration_format_round_trip(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


def test_duration_format_shortest():
    assert format_duration(5400.0) == "1h30m"
    assert format_duration(0.0) == "0s"
    assert format_duration(0.25) == "250ms"
