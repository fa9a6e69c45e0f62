"""Tests for the Prometheus rules in rules/ and the example Alertmanager configuration.

They run the real promtool, amtool and prometheus-alertmanager binaries. A missing binary
fails the test with the package to install, and no test here is skipped for it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from helm.generate import CHART_DIR, SCHEMA_PATH, chart_rule_parameters
from rules.render import (
    ENTITY_DASHBOARD_PATH,
    HEALTH_DASHBOARD_PATH,
    RULES_PATH,
    RuleParameters,
    kebab_case,
    main,
    render_rule_groups,
    render_rules_yaml,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
RULE_TEST_FILES = sorted((REPO_ROOT / "rules" / "tests").glob("*.yml"))
ALERTMANAGER_CONFIG = REPO_ROOT / "examples" / "alertmanager" / "alertmanager.yml"
RUNBOOK_DIR = REPO_ROOT / "docs" / "runbooks"

# Alerts about one entity of a detector: they carry the detector and entity labels and
# link the entity dashboard.
ANOMALY_ALERTS = {"AnomalyDetected", "AnomalyPeerOutlier", "NoisyNeighbor", "EquipmentFault"}
# Anomaly alerts whose value is a score. NoisyNeighbor's value is always 1.
SCORE_ALERTS = {"AnomalyDetected", "AnomalyPeerOutlier", "EquipmentFault"}
SELF_MONITORING_ALERTS = {
    "AnomalyExporterDown",
    "AnomalyDetectorFailing",
    "AnomalyModelsStale",
    "AnomalySourceDown",
}
REQUIRED_ANNOTATIONS = ("summary", "description", "runbook_url", "dashboard_url")

# Debian package that contains each binary.
PACKAGES = {
    "promtool": "prometheus",
    "amtool": "prometheus-alertmanager",
    "prometheus-alertmanager": "prometheus-alertmanager",
}


def find_binary(name: str) -> str:
    """Return the path of a required binary, or fail the test when it is missing."""
    path = shutil.which(name)
    if path is None and Path("/usr/bin", name).is_file():
        path = str(Path("/usr/bin", name))
    if path is None:
        package = PACKAGES[name]
        pytest.fail(
            f"{name} not found on PATH or in /usr/bin. Install it with "
            f"`apt-get install -y --no-install-recommends {package}`."
        )
    return path


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def all_rules(rule_file: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in rule_file["groups"] for rule in group["rules"]]


def all_alerts(rule_file: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for rule in all_rules(rule_file) if "alert" in rule]


def committed_rules() -> dict[str, Any]:
    return yaml.safe_load(RULES_PATH.read_text(encoding="utf-8"))


def alerts_named(rule_file: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [alert for alert in all_alerts(rule_file) if alert["alert"] == name]


# Generated file


def test_committed_rules_match_render():
    committed = RULES_PATH.read_text(encoding="utf-8")
    assert committed == render_rules_yaml(), (
        f"{RULES_PATH.relative_to(REPO_ROOT)} is out of date; regenerate it with `python -m rules.render`"
    )


def test_render_is_deterministic():
    assert render_rules_yaml() == render_rules_yaml()
    assert yaml.safe_load(render_rules_yaml()) == render_rule_groups()


def test_main_writes_rule_file(tmp_path):
    output = tmp_path / "rules.yml"

    assert main(["--output", str(output)]) == 0
    assert output.read_text(encoding="utf-8") == render_rules_yaml()


# promtool


def test_promtool_check_rules():
    promtool = find_binary("promtool")

    result = run([promtool, "check", "rules", str(RULES_PATH)])

    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_tests_use_generated_file():
    assert RULE_TEST_FILES, "no promtool test files found in rules/tests"
    for test_file in RULE_TEST_FILES:
        test_suite = yaml.safe_load(test_file.read_text(encoding="utf-8"))
        rule_files = [(test_file.parent / path).resolve() for path in test_suite["rule_files"]]
        assert rule_files == [RULES_PATH], f"{test_file.name} must test only {RULES_PATH.name}"


def test_promtool_test_rules():
    promtool = find_binary("promtool")
    assert RULE_TEST_FILES, "no promtool test files found in rules/tests"

    result = run([promtool, "test", "rules", *map(str, RULE_TEST_FILES)])

    assert result.returncode == 0, result.stdout + result.stderr


def test_short_durations_pass_promtool(tmp_path):
    promtool = find_binary("promtool")
    params = RuleParameters(
        evaluation_interval="5s",
        warning_for="20s",
        critical_for="10s",
        escalation_window="1m",
        exporter_down_for="15s",
        detector_failing_window="30s",
        detector_failing_for="10s",
        models_stale_after_seconds=120,
        models_stale_for="10s",
        source_down_for="15s",
        peer_warning_for="20s",
        peer_critical_for="10s",
        noisy_neighbor_for="15s",
        noisy_neighbor_critical_for="1m",
        equipment_fault_warning_for="20s",
        equipment_fault_critical_for="10s",
    )
    rule_file = tmp_path / "short.rules.yml"
    rule_file.write_text(render_rules_yaml(params), encoding="utf-8")

    result = run([promtool, "check", "rules", str(rule_file)])

    assert result.returncode == 0, result.stdout + result.stderr
    rendered = render_rule_groups(params)
    assert {group["interval"] for group in rendered["groups"]} == {"5s"}
    critical = [rule for rule in all_alerts(rendered) if rule["labels"]["severity"] == "critical"]
    assert critical[0]["for"] == "10s"
    assert "min_over_time(anomaly_score[1m])" in critical[0]["expr"]
    assert "anomaly_score offset 1m" in critical[0]["expr"]
    durations = {
        (alert["alert"], alert["labels"]["severity"]): alert["for"]
        for alert in all_alerts(rendered)
        if alert["alert"] in ANOMALY_ALERTS - {"AnomalyDetected"}
    }
    assert durations == {
        ("AnomalyPeerOutlier", "warning"): "20s",
        ("AnomalyPeerOutlier", "critical"): "10s",
        ("NoisyNeighbor", "warning"): "15s",
        ("NoisyNeighbor", "critical"): "1m",
        ("EquipmentFault", "warning"): "20s",
        ("EquipmentFault", "critical"): "10s",
    }


# Rendering with Helm templates and invalid values


def test_render_keeps_helm_templates_verbatim():
    params = RuleParameters(
        warning_for="{{ .Values.rules.warningFor }}",
        warning_score="{{ .Values.rules.warningScore }}",
        exporter_job="{{ .Values.rules.exporterJob }}",
        runbook_base_url="{{ .Values.rules.runbookBaseUrl }}",
        template_open="{{`{{",
        template_close="}}`}}",
    )

    rendered = render_rule_groups(params)
    warning = alerts_named(rendered, "AnomalyDetected")[0]
    exporter_down = alerts_named(rendered, "AnomalyExporterDown")[0]

    assert warning["for"] == "{{ .Values.rules.warningFor }}"
    assert warning["expr"] == "anomaly_score >= {{ .Values.rules.warningScore }}"
    assert warning["annotations"]["runbook_url"] == "{{ .Values.rules.runbookBaseUrl }}/anomaly-detected.md"
    assert "{{`{{ $labels.entity }}`}}" in warning["annotations"]["description"]
    assert 'up{job="{{ .Values.rules.exporterJob }}"}' in exporter_down["expr"]


def test_helm_delimiters_wrap_every_action():
    # Helm outputs a backquoted string unchanged, so every Prometheus action must sit whole
    # inside the delimiters and contain no backquote of its own.
    params = RuleParameters(template_open="{{`{{", template_close="}}`}}")
    wrapped_action = re.compile(r"\{\{`(\{\{.*?\}\})`\}\}")
    for alert in all_alerts(render_rule_groups(params)):
        for key, text in alert["annotations"].items():
            for body in wrapped_action.findall(text):
                assert "`" not in body, f"{alert['alert']} {key} has a backquote in {body!r}"
            outside = wrapped_action.sub("", text)
            assert "{{" not in outside, f"{alert['alert']} {key} has an unwrapped action in {outside!r}"
            assert "}}" not in outside, f"{alert['alert']} {key} has an unwrapped action in {outside!r}"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("warning_for", "5 minutes", "invalid warning_for '5 minutes'"),
        ("warning_for", "", "invalid warning_for ''"),
        ("critical_for", "5m1h", "invalid critical_for '5m1h'"),
        ("escalation_window", "0s", "invalid escalation_window '0s': must be longer than zero"),
        ("warning_score", 0, "invalid warning_score 0"),
        ("warning_score", True, "invalid warning_score True"),
        ("critical_score", 0.5, "invalid critical_score 0.5: must be above warning_score 1"),
        ("models_stale_after_seconds", float("nan"), "invalid models_stale_after_seconds nan"),
        ("exporter_job", 'anomaly"exporter', "invalid exporter_job"),
        ("exporter_down_severity", "", "invalid exporter_down_severity ''"),
        ("peer_warning_for", "15", "invalid peer_warning_for '15'"),
        ("peer_warning_score", -1, "invalid peer_warning_score -1"),
        ("peer_critical_score", 1, "invalid peer_critical_score 1: must be above peer_warning_score 1"),
        ("noisy_neighbor_for", "5min", "invalid noisy_neighbor_for '5min'"),
        (
            "noisy_neighbor_critical_for",
            "5m",
            "invalid noisy_neighbor_critical_for '5m': must be longer than noisy_neighbor_for '5m'",
        ),
        ("equipment_fault_warning_score", "1", "invalid equipment_fault_warning_score '1'"),
        (
            "equipment_fault_critical_score",
            0.5,
            "invalid equipment_fault_critical_score 0.5: must be above equipment_fault_warning_score 1",
        ),
        ("equipment_fault_critical_for", "10 m", "invalid equipment_fault_critical_for '10 m'"),
    ],
)
def test_render_rejects_invalid_parameters(field, value, message):
    with pytest.raises(ValueError) as error:
        RuleParameters(**{field: value})

    assert message in str(error.value)


# Alert contents


def test_alert_names_and_tiers():
    rule_file = committed_rules()
    names = {alert["alert"] for alert in all_alerts(rule_file)}

    assert names == ANOMALY_ALERTS | SELF_MONITORING_ALERTS
    for name in ANOMALY_ALERTS:
        severities = [alert["labels"]["severity"] for alert in alerts_named(rule_file, name)]
        assert severities == ["warning", "critical"], f"{name} has the tiers {severities}"


def test_tiers_share_labels():
    # The inhibit rule matches warning and critical on alertname, detector and entity, so
    # the two tiers of an alert differ only in severity and select the same series.
    rule_file = committed_rules()
    for name in ANOMALY_ALERTS - {"AnomalyDetected"}:
        warning, critical = alerts_named(rule_file, name)
        metric = warning["expr"].split(" ")[0]
        assert critical["expr"].split(" ")[0] == metric, f"{name} tiers select different series"
        assert warning["labels"] == {"severity": "warning"}, f"{name} warning has other labels"
        assert critical["labels"] == {"severity": "critical"}, f"{name} critical has other labels"


def test_anomaly_type_never_in_alert_labels():
    # A changing type must not change an alert's identity, so the type is read in
    # annotations only.
    for alert in all_alerts(committed_rules()):
        name = alert["alert"]
        assert "type" not in alert["labels"], f"{name} sets a type label"
        assert "anomaly_type" not in alert["expr"], f"{name} selects anomaly_type in its expression"


def test_anomaly_detected_expressions_unchanged():
    warning, critical = alerts_named(committed_rules(), "AnomalyDetected")

    assert warning["expr"] == "anomaly_score >= 1"
    assert critical["expr"].startswith("anomaly_score >= 2\nor\n")
    for alert in (warning, critical):
        description = alert["annotations"]["description"]
        assert 'printf "anomaly_type{detector=%q, entity=%q}"' in description
        assert "anomaly_contribution_ratio" in description
        assert "anomaly_equipment_fault" in description


def test_alerts_have_labels_and_annotations():
    for alert in all_alerts(committed_rules()):
        name = alert["alert"]
        assert alert.get("for"), f"{name} has no for duration"
        assert alert["labels"].get("severity") in ("warning", "critical"), f"{name} has an invalid severity"
        for key in REQUIRED_ANNOTATIONS:
            assert alert["annotations"].get(key), f"{name} has no {key} annotation"
        summary = alert["annotations"]["summary"]
        assert summary.endswith("."), f"{name} summary does not end with a full stop: {summary!r}"
        assert ". " not in summary, f"{name} summary has more than one sentence: {summary!r}"


def test_descriptions_name_entity_or_target():
    for alert in all_alerts(committed_rules()):
        name = alert["alert"]
        description = alert["annotations"]["description"]
        if name in ANOMALY_ALERTS:
            assert "{{ $labels.detector }}" in description, f"{name} description does not name the detector"
            assert "{{ $labels.entity }}" in description, f"{name} description does not name the entity"
            if name in SCORE_ALERTS:
                assert "$value" in description, f"{name} description does not show the score"
        else:
            assert "$labels.instance" in description or "$labels.job" in description, (
                f"{name} description names no exporter instance or job"
            )


def test_runbook_urls_point_at_runbooks():
    base_url = RuleParameters().runbook_base_url
    for alert in all_alerts(committed_rules()):
        name = alert["alert"]
        runbook_url = alert["annotations"]["runbook_url"]
        file_name = f"{kebab_case(name)}.md"
        assert runbook_url == f"{base_url}/{file_name}"
        assert (RUNBOOK_DIR / file_name).is_file(), f"runbook docs/runbooks/{file_name} of {name} is missing"


def test_dashboard_urls():
    grafana = RuleParameters().grafana_base_url
    entity_url = (
        f"{grafana}{ENTITY_DASHBOARD_PATH}"
        "?var-detector={{ $labels.detector | urlquery }}&var-entity={{ $labels.entity | urlquery }}"
    )
    for alert in all_alerts(committed_rules()):
        dashboard_url = alert["annotations"]["dashboard_url"]
        if alert["alert"] in ANOMALY_ALERTS:
            assert dashboard_url == entity_url
        else:
            assert dashboard_url == f"{grafana}{HEALTH_DASHBOARD_PATH}"


def test_chart_maps_every_parameter():
    # Every parameter except the delimiters is a chart value, listed in values.yaml and
    # required by values.schema.json.
    chart_params = chart_rule_parameters()
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    required = set(schema["properties"]["rules"]["required"])
    for field in dataclasses.fields(RuleParameters):
        if field.name in ("template_open", "template_close"):
            continue
        value = getattr(chart_params, field.name)
        assert isinstance(value, str) and "{{" in value, f"{field.name} is not mapped to a chart value"
        for key in re.findall(r"\.Values\.rules\.(\w+)", value):
            assert key in values["rules"], f"values.yaml has no rules.{key} for {field.name}"
            assert key in required, f"values.schema.json does not require rules.{key}"


def test_kebab_case():
    assert kebab_case("AnomalyDetected") == "anomaly-detected"
    assert kebab_case("AnomalyExporterDown") == "anomaly-exporter-down"


# Alertmanager example


def test_amtool_check_config():
    amtool = find_binary("amtool")

    result = run([amtool, "check-config", str(ALERTMANAGER_CONFIG)])

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["severity=critical"], "pager"),
        (["severity=warning"], "chat"),
        ([], "default"),
    ],
)
def test_alertmanager_routes_by_severity(labels, receiver):
    amtool = find_binary("amtool")
    command = [amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}"]

    result = run([*command, "alertname=AnomalyDetected", "detector=tenant_cpu", "entity=namespace=shop", *labels])

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


def test_alertmanager_groups_and_inhibit_rule():
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text(encoding="utf-8"))

    assert config["route"]["group_by"] == ["alertname", "detector", "entity"]
    assert config["inhibit_rules"] == [
        {
            "source_matchers": ['severity="critical"'],
            "target_matchers": ['severity="warning"'],
            "equal": ["alertname", "detector", "entity", "fault", "bearing", "node"],
        }
    ]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_request(url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    return json.loads(text) if text.strip().startswith(("[", "{")) else text


def wait_until_ready(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"alertmanager exited with code {process.returncode}:\n{log_path.read_text()}")
        try:
            http_request(f"{url}/-/ready")
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    pytest.fail(f"alertmanager was not ready after {timeout}s:\n{log_path.read_text()}")


@pytest.mark.stack
def test_inhibit_rule_silences_warning(tmp_path):
    """Post alerts to a real Alertmanager running the example's routes and inhibit rules."""
    binary = find_binary("prometheus-alertmanager")
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text(encoding="utf-8"))
    # Receivers without integrations send nothing, so the test reaches no other host.
    config["receivers"] = [{"name": receiver["name"]} for receiver in config["receivers"]]
    config_path = tmp_path / "alertmanager.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "alertmanager.log"
    command = [
        binary,
        f"--config.file={config_path}",
        f"--storage.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
    ]

    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(url, process, log_path)
        shop = {"alertname": "AnomalyDetected", "detector": "tenant_cpu", "entity": "namespace=shop"}
        http_request(
            f"{url}/api/v2/alerts",
            [
                {"labels": {**shop, "severity": "critical"}},
                {"labels": {**shop, "severity": "warning"}},
                {"labels": {**shop, "entity": "namespace=cart", "severity": "warning"}},
                {"labels": {**shop, "detector": "tenant_memory", "severity": "warning"}},
            ],
        )

        # Alertmanager loads source alerts into its inhibitor asynchronously, so poll until
        # the critical alert mutes its warning. Each poll computes every state afresh.
        shop_warning = ("tenant_cpu", "namespace=shop", "warning")
        states: dict[tuple[str, str, str], str] = {}
        deadline = time.monotonic() + 10
        while states.get(shop_warning) != "suppressed" and time.monotonic() < deadline:
            time.sleep(0.2)
            states = {}
            for alert in http_request(f"{url}/api/v2/alerts"):
                labels = alert["labels"]
                states[(labels["detector"], labels["entity"], labels["severity"])] = alert["status"]["state"]
    finally:
        process.terminate()
        process.wait(timeout=10)

    assert len(states) == 4, f"expected the 4 posted alerts, Alertmanager returned {states}"
    assert states[("tenant_cpu", "namespace=shop", "critical")] == "active"
    assert states[shop_warning] == "suppressed"
    assert states[("tenant_cpu", "namespace=cart", "warning")] == "active"
    assert states[("tenant_memory", "namespace=shop", "warning")] == "active"
