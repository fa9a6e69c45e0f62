"""The Helm chart in helm/anomaly-exporter/, rendered and linted by Helm's own Go engine.

helm-python-sdk binds Helm v4's Go SDK, so rendering, values.schema.json validation and
`helm lint --strict` run the same code as the helm binary, without a cluster. Every rendered
object is validated against the Kubernetes schemas (kubernetes-validate, strict mode, which
rejects unknown fields), and the ServiceMonitor and PrometheusRule against the Prometheus
Operator CRDs in SCHEMA_DIR, outside the repository. The rendered exporter configuration runs
through `check-config`, and the rendered rules through `promtool check rules`.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from detectors import detector_type_names
from exporter import __version__
from exporter.config import DetectorConfig, SourceConfig
from exporter.demo.stack import find_binary
from exporter.sharding import Shard, resolve_shard
from helm import generate
from rules.render import RULES_PATH, RuleParameters, render_rule_groups

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = REPO_ROOT / "helm" / "anomaly-exporter"
SCHEMA_DIR = REPO_ROOT.parent / "shared" / "schemas"
RELEASE = "anomaly-exporter"
NAMESPACE = "monitoring"
SECRETS_DIR = "/etc/anomaly-exporter/secrets"

# The oldest Kubernetes version that Chart.yaml's kubeVersion allows, and the newest that
# kubernetes-validate has schemas for.
KUBERNETES_VERSIONS = ("1.25", kubernetes_validate.latest_version())

CRD_FILES = {
    "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
}

AUTH_VALUES = {
    "sourceCredentials": {
        "bearerToken": {"secretName": "prometheus-token", "key": "token"},
        "tls": {"caSecretName": "prometheus-ca", "certSecretName": "exporter-client-tls"},
    },
    "source": {"url": "https://prometheus.example.internal:9090", "headers": {"X-Scope-OrgID": "platform"}},
}

BASIC_AUTH_VALUES = {
    "sourceCredentials": {
        "basicAuth": {"username": "exporter", "secretName": "prometheus-basic-auth", "key": "pass"},
        "tls": {"caSecretName": "prometheus-ca", "caKey": "bundle.pem"},
    },
}

VALUE_SETS = {
    "default": {},
    "one-shard": {"shards": 1},
    "three-shards": {"shards": 3},
    "auth-secret": AUTH_VALUES,
    "basic-auth": BASIC_AUTH_VALUES,
    "monitoring-off": {"serviceMonitor": {"enabled": False}, "prometheusRule": {"enabled": False}},
    "network-policy": {"networkPolicy": {"enabled": True}},
    "no-persistence": {"persistence": {"enabled": False}, "dashboards": {"enabled": False}},
}


# Rendering -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart, values: dict[str, Any] | None = None) -> dict[str, str]:
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Parse every Kubernetes object in the rendered templates; NOTES.txt is not YAML."""
    found = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        found.extend(document for document in yaml.safe_load_all(text) if document)
    return found


def of_kind(items: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [item for item in items if item["kind"] == kind]


def one(items: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = of_kind(items, kind)
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def exporter_config(items: list[dict[str, Any]]) -> dict[str, Any]:
    configmap = next(item for item in of_kind(items, "ConfigMap") if "exporter.yml" in item["data"])
    return yaml.safe_load(configmap["data"]["exporter.yml"])


def container(items: list[dict[str, Any]]) -> dict[str, Any]:
    return one(items, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module", params=sorted(VALUE_SETS), ids=sorted(VALUE_SETS))
def case(request, chart):
    """One value set of the matrix, with its rendered objects."""
    values = VALUE_SETS[request.param]
    return values, objects(render(chart, values))


# Lint and schemas of the rendered objects ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_strict(name):
    report = helm_python.lint(CHART_DIR, VALUE_SETS[name], strict=True, namespace=NAMESPACE)
    problems = [message for message in report["messages"] if message["severity"] >= 2]

    assert report["errors"] == []
    assert problems == []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_schemas(case, version):
    _, items = case
    native = [item for item in items if item["kind"] not in CRD_FILES]
    assert native
    for item in native:
        name = f"{item['kind']}/{item['metadata']['name']}"
        try:
            kubernetes_validate.validate(item, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name} is invalid for Kubernetes {version} at {list(error.path)}: {error.message}")


def strict_schema(schema: Any) -> Any:
    """Return a copy of a CRD schema that rejects fields it does not declare.

    The API server drops or rejects undeclared fields of a structural CRD schema, but the
    OpenAPI text leaves additionalProperties out, so plain JSON Schema would accept a typo.
    """
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: strict_schema(value) for key, value in schema.items()}
    preserves = schema.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in schema and "additionalProperties" not in schema and not preserves:
        strict["additionalProperties"] = False
    return strict


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict[str, Any]]:
    if not SCHEMA_DIR.is_dir():
        pytest.fail(
            f"Prometheus Operator CRD schemas not found: expected the folder {SCHEMA_DIR} "
            "(../shared/schemas from the repository root) with the ServiceMonitor and PrometheusRule CRDs"
        )
    schemas = {}
    for kind, file_name in CRD_FILES.items():
        path = SCHEMA_DIR / file_name
        if not path.is_file():
            pytest.fail(f"CRD schema of {kind} not found: expected {path}")
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schemas[kind] = strict_schema(version["schema"]["openAPIV3Schema"])
    return schemas


def test_crd_schemas(case, crd_schemas):
    values, items = case
    for kind, schema in crd_schemas.items():
        for item in of_kind(items, kind):
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(item), key=lambda e: list(e.path))
            messages = [f"{list(error.path)}: {error.message}" for error in errors]
            assert messages == [], f"{kind} does not match its CRD"


def test_strict_schema_rejects_typo(crd_schemas):
    # Guards test_crd_schemas: a misspelt field must fail.
    service_monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "endpoints": [{"port": "http-metrics", "honourLabels": True}]},
    }

    assert not jsonschema.Draft7Validator(crd_schemas["ServiceMonitor"]).is_valid(service_monitor)


# The exporter configuration ------------------------------------------------------------------


def credential_paths(config: dict[str, Any]) -> list[str]:
    source = config["source"]
    paths = [source.get("bearer_token_file"), (source.get("basic_auth") or {}).get("password_file")]
    paths += [source.get("tls", {}).get(key) for key in ("ca_file", "cert_file", "key_file")]
    return [path for path in paths if path]


def test_config_passes_check_config(case, tmp_path):
    # The credential files live in Secrets mounted under SECRETS_DIR in the pod; here they are
    # placeholder files under tmp_path, because check-config requires that they exist.
    _, items = case
    text = yaml.safe_dump(exporter_config(items))
    for path in credential_paths(exporter_config(items)):
        local = tmp_path / "secrets" / Path(path).relative_to(SECRETS_DIR)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("placeholder\n", encoding="utf-8")
    config_path = tmp_path / "exporter.yml"
    config_path.write_text(text.replace(SECRETS_DIR, str(tmp_path / "secrets")), encoding="utf-8")

    result = subprocess.run(
        [sys.executable, "-m", "exporter", "check-config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr


def test_credentials_are_mounted(case):
    _, items = case
    spec = one(items, "StatefulSet")["spec"]["template"]["spec"]
    mounts = {mount["mountPath"]: mount["name"] for mount in spec["containers"][0]["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    for path in credential_paths(exporter_config(items)):
        folder, file_name = str(Path(path).parent), Path(path).name
        assert folder in mounts, path
        secret = volumes[mounts[folder]]["secret"]
        assert file_name in [item["path"] for item in secret["items"]], path


def test_auth_secret_names(chart):
    items = objects(render(chart, AUTH_VALUES))
    volumes = one(items, "StatefulSet")["spec"]["template"]["spec"]["volumes"]
    secrets = {volume["secret"]["secretName"] for volume in volumes if "secret" in volume}

    assert secrets == {"prometheus-token", "prometheus-ca", "exporter-client-tls"}


def test_auth_config_paths(chart):
    source = exporter_config(objects(render(chart, AUTH_VALUES)))["source"]

    assert source["bearer_token_file"] == f"{SECRETS_DIR}/bearer-token/token"
    assert source["tls"]["ca_file"] == f"{SECRETS_DIR}/tls-ca/ca.crt"
    assert source["tls"]["cert_file"] == f"{SECRETS_DIR}/tls-client/tls.crt"
    assert source["tls"]["key_file"] == f"{SECRETS_DIR}/tls-client/tls.key"
    assert source["headers"] == {"X-Scope-OrgID": "platform"}


def test_basic_auth_config(chart):
    source = exporter_config(objects(render(chart, BASIC_AUTH_VALUES)))["source"]

    assert source["basic_auth"] == {"username": "exporter", "password_file": f"{SECRETS_DIR}/basic-auth/pass"}
    assert source["tls"]["ca_file"] == f"{SECRETS_DIR}/tls-ca/bundle.pem"


def test_config_state_dir_mounted(case):
    _, items = case
    mounts = {mount["name"]: mount["mountPath"] for mount in container(items)["volumeMounts"]}

    assert mounts["state"] == exporter_config(items)["state_dir"]


def test_config_listens_on_service_port(case):
    _, items = case
    service = one(items, "Service")

    assert exporter_config(items)["listen_address"] == "0.0.0.0:9847"
    assert service["spec"]["ports"] == [
        {"name": "http-metrics", "port": 9847, "targetPort": "http-metrics", "protocol": "TCP"}
    ]


def test_config_file_argument(case):
    _, items = case
    arguments = container(items)["args"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container(items)["volumeMounts"]}

    assert arguments[:2] == ["--config", f"{mounts['config']}/exporter.yml"]


def test_config_checksum_changes(chart):
    first = one(objects(render(chart)), "StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    second = one(objects(render(chart, {"source": {"timeout": "1m"}})), "StatefulSet")
    second = second["spec"]["template"]["metadata"]["annotations"]

    assert first["checksum/config"] != second["checksum/config"]


# Shards -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 3])
def test_replicas_are_shards(chart, shards):
    statefulset = one(objects(render(chart, {"shards": shards})), "StatefulSet")

    assert statefulset["spec"]["replicas"] == shards


@pytest.mark.parametrize("shards", [1, 3])
def test_pods_resolve_their_shard(chart, shards):
    # Each pod's environment, with the HOSTNAME Kubernetes gives a StatefulSet pod, must
    # resolve to its own shard.
    statefulset = one(objects(render(chart, {"shards": shards})), "StatefulSet")
    environment = {variable["name"]: variable["value"] for variable in container([statefulset])["env"]}
    for ordinal in range(shards):
        pod_environment = {**environment, "HOSTNAME": f"{statefulset['metadata']['name']}-{ordinal}"}
        assert resolve_shard(None, None, pod_environment) == Shard(ordinal, shards)


def test_pods_share_one_service(chart):
    items = objects(render(chart, {"shards": 3}))
    statefulset = one(items, "StatefulSet")
    service = one(items, "Service")

    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]


# Pod settings ------------------------------------------------------------------------------


def test_security_context(case):
    _, items = case
    pod = one(items, "StatefulSet")["spec"]["template"]["spec"]
    context = container(items)["securityContext"]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False


def test_probes(case):
    _, items = case
    probes = container(items)

    assert probes["livenessProbe"]["httpGet"] == {"path": "/-/healthy", "port": "http-metrics"}
    assert probes["readinessProbe"]["httpGet"] == {"path": "/-/ready", "port": "http-metrics"}


def test_resources_set(case):
    _, items = case
    resources = container(items)["resources"]

    assert "memory" in resources["limits"]
    assert "cpu" in resources["requests"]


def test_state_claim_template(chart):
    statefulset = one(objects(render(chart)), "StatefulSet")
    claims = statefulset["spec"]["volumeClaimTemplates"]

    assert [claim["metadata"]["name"] for claim in claims] == ["state"]
    assert claims[0]["spec"]["resources"]["requests"]["storage"] == "1Gi"


def test_state_without_persistence(chart):
    statefulset = one(objects(render(chart, {"persistence": {"enabled": False}})), "StatefulSet")
    volumes = {volume["name"]: volume for volume in statefulset["spec"]["template"]["spec"]["volumes"]}

    assert "volumeClaimTemplates" not in statefulset["spec"]
    assert volumes["state"] == {"name": "state", "emptyDir": {}}


def test_disruption_budget(case):
    _, items = case
    budget = one(items, "PodDisruptionBudget")
    statefulset = one(items, "StatefulSet")

    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"] == statefulset["spec"]["selector"]


def test_network_policy_default_off(chart):
    assert of_kind(objects(render(chart)), "NetworkPolicy") == []


def test_network_policy_on(chart):
    policy = one(objects(render(chart, {"networkPolicy": {"enabled": True}})), "NetworkPolicy")
    egress_ports = [port for rule in policy["spec"]["egress"] for port in rule["ports"]]

    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": "http-metrics", "protocol": "TCP"}]
    assert {"port": 9090, "protocol": "TCP"} in egress_ports
    assert {"port": 53, "protocol": "UDP"} in egress_ports


def test_service_account(chart):
    items = objects(render(chart))
    account = one(items, "ServiceAccount")
    pod = one(items, "StatefulSet")["spec"]["template"]["spec"]

    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["automountServiceAccountToken"] is False


def test_image_defaults_to_app_version(chart):
    assert container(objects(render(chart)))["image"] == f"anomaly-exporter:{__version__}"


def test_app_version_matches_exporter(chart):
    assert chart.metadata["appVersion"] == __version__


# ServiceMonitor ------------------------------------------------------------------------------


def test_service_monitor(chart):
    monitor = one(objects(render(chart)), "ServiceMonitor")
    endpoint = monitor["spec"]["endpoints"][0]

    assert endpoint["port"] == "http-metrics"
    assert endpoint["honorLabels"] is True
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_service_monitor_selects_service(chart):
    items = objects(render(chart))
    monitor = one(items, "ServiceMonitor")
    service = one(items, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]

    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_service_monitor_job_matches_rules(chart):
    items = objects(render(chart, {"scrapeJob": "anomalies"}))
    relabelings = one(items, "ServiceMonitor")["spec"]["endpoints"][0]["relabelings"]
    job = [rule for rule in relabelings if rule["targetLabel"] == "job"]
    rules = yaml.safe_dump(one(items, "PrometheusRule")["spec"])

    assert job == [{"action": "replace", "targetLabel": "job", "replacement": "anomalies"}]
    assert 'job="anomalies"' in rules


def test_monitoring_objects_off(chart):
    items = objects(render(chart, VALUE_SETS["monitoring-off"]))

    assert of_kind(items, "ServiceMonitor") == []
    assert of_kind(items, "PrometheusRule") == []


# PrometheusRule ------------------------------------------------------------------------------


def rule_groups(items: list[dict[str, Any]]) -> dict[str, Any]:
    return one(items, "PrometheusRule")["spec"]


def test_default_rules_equal_rule_file(chart):
    committed = yaml.safe_load(RULES_PATH.read_text(encoding="utf-8"))

    assert rule_groups(objects(render(chart))) == committed


def test_rules_follow_values(chart):
    values = {
        "scrapeJob": "anomalies",
        "rules": {
            "warningScore": 1.5,
            "warningFor": "10m",
            "criticalScore": 3,
            "escalationWindow": "1h",
            "modelsStaleAfter": "1d12h",
            "sourceDownSeverity": "critical",
            "runbookBaseUrl": "https://wiki.example.org/runbooks/",
            "grafanaBaseUrl": "https://grafana.example.org",
        },
    }
    expected = render_rule_groups(
        RuleParameters(
            exporter_job="anomalies",
            warning_score=1.5,
            warning_for="10m",
            critical_score=3,
            escalation_window="1h",
            models_stale_after_seconds=36 * 3600,
            source_down_severity="critical",
            runbook_base_url="https://wiki.example.org/runbooks",
            grafana_base_url="https://grafana.example.org",
        )
    )

    assert rule_groups(objects(render(chart, values))) == expected


def test_promtool_checks_rules(case, tmp_path):
    values, items = case
    if not of_kind(items, "PrometheusRule"):
        assert values.get("prometheusRule", {}).get("enabled") is False
        return
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rule_groups(items)), encoding="utf-8")

    result = subprocess.run([find_binary("promtool"), "check", "rules", str(path)], capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr


def test_critical_below_warning_fails(chart):
    with pytest.raises(helm_python.HelmError, match="rules.criticalScore"):
        render(chart, {"rules": {"criticalScore": 1}})


# Dashboards --------------------------------------------------------------------------------


def test_dashboards_rendered(chart):
    items = objects(render(chart))
    rendered = {}
    for configmap in of_kind(items, "ConfigMap"):
        if configmap["metadata"]["labels"].get("grafana_dashboard") == "1":
            rendered.update(configmap["data"])
    files = {path.name: path.read_text(encoding="utf-8") for path in CHART_DIR.glob("dashboards/*.json")}

    assert rendered == files


def test_dashboards_off(chart):
    items = objects(render(chart, {"dashboards": {"enabled": False}}))

    assert [item for item in of_kind(items, "ConfigMap") if "grafana_dashboard" in item["metadata"]["labels"]] == []


def test_dashboard_template_with_file(tmp_path):
    # Independent of which dashboards grafana/ has now: a copy of the chart with one file.
    copy_dir = tmp_path / "anomaly-exporter"
    with helm_python.Chart.load(CHART_DIR) as loaded:
        loaded.save_dir(tmp_path)
    for path in (copy_dir / "dashboards").glob("*.json"):
        path.unlink()
    (copy_dir / "dashboards").mkdir(exist_ok=True)
    dashboard = json.dumps({"uid": "x", "panels": [{"legendFormat": "{{namespace}}"}]})
    (copy_dir / "dashboards" / "My_Board.json").write_text(dashboard, encoding="utf-8")
    with helm_python.Chart.load(copy_dir) as loaded:
        items = objects(render(loaded, {"dashboards": {"namespace": "grafana"}}))
    boards = [item for item in of_kind(items, "ConfigMap") if "grafana_dashboard" in item["metadata"]["labels"]]

    assert len(boards) == 1
    assert boards[0]["metadata"]["name"] == "anomaly-exporter-dashboard-my-board"
    assert boards[0]["metadata"]["namespace"] == "grafana"
    assert boards[0]["data"] == {"My_Board.json": dashboard}


# Generated files ---------------------------------------------------------------------------


def test_generated_files_in_sync():
    stale = [str(path.relative_to(REPO_ROOT)) for path in generate.out_of_date()]

    assert stale == [], "run `python -m helm.generate` to update the chart"


def test_generate_check_flags_edit(tmp_path, monkeypatch):
    # Guards test_generated_files_in_sync: an edited copy must count as out of date.
    edited = tmp_path / "_rules.tpl"
    edited.write_text(generate.render_rules_template() + "# edited\n", encoding="utf-8")
    monkeypatch.setattr(generate, "RULES_TEMPLATE_PATH", edited)

    assert edited in generate.out_of_date()


def test_dashboard_copies_match_grafana():
    source = generate.SOURCE_DASHBOARD_DIR
    copies = {path.name: path.read_bytes() for path in generate.CHART_DASHBOARD_DIR.glob("*.json")}
    originals = {path.name: path.read_bytes() for path in source.glob("*.json")} if source.is_dir() else {}

    assert copies == originals


def test_schema_types_match_registry(chart):
    detector = chart.schema["$defs"]["detector"]

    assert detector["properties"]["type"]["enum"] == list(detector_type_names())


def test_schema_detector_keys_match_config(chart):
    detector = chart.schema["$defs"]["detector"]

    assert set(detector["properties"]) == set(DetectorConfig.model_fields)


def test_schema_source_keys_exist(chart):
    source = chart.schema["properties"]["source"]

    assert set(source["properties"]) <= set(SourceConfig.model_fields)


# values.schema.json rejections --------------------------------------------------------------


def schema_error(chart, values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmValuesError) as caught:
        render(chart, values)
    return str(caught.value)


def test_schema_rejects_zero_shards(chart):
    message = schema_error(chart, {"shards": 0})

    assert "at '/shards': minimum: got 0, want 1" in message


def test_schema_rejects_unknown_type(chart):
    detectors = [{"name": "cpu", "query": "up", "type": "prophet"}]

    message = schema_error(chart, {"detectors": detectors})

    assert "at '/detectors/0/type'" in message
    assert "seasonal" in message


@pytest.mark.parametrize(
    ("values", "location"),
    [
        ({"detectors": []}, "/detectors"),
        ({"detectors": [{"name": "cpu", "query": "up", "type": "seasonal", "fit_windw": "1d"}]}, "/detectors/0"),
        ({"source": {"bearer_token_file": "/token"}}, "/source"),
        ({"rules": {"warningFor": "5 minutes"}}, "/rules/warningFor"),
        ({"rules": {"escalationWindow": "0m"}}, "/rules/escalationWindow"),
        ({"rules": {"modelsStaleAfter": "500ms"}}, "/rules/modelsStaleAfter"),
        ({"rules": {"runbookBaseUrl": "wiki/runbooks"}}, "/rules/runbookBaseUrl"),
        ({"scrapeJob": 'a"b'}, "/scrapeJob"),
        ({"shard": 2}, "at '':"),
    ],
    ids=["no-detectors", "detector-typo", "credential-file", "duration", "zero-window", "ms-limit", "url", "job", "typo"],
)
def test_schema_rejects(chart, values, location):
    assert location in schema_error(chart, values)


def test_both_auth_methods_fail(chart):
    credentials = copy.deepcopy(AUTH_VALUES["sourceCredentials"])
    credentials["basicAuth"] = BASIC_AUTH_VALUES["sourceCredentials"]["basicAuth"]

    with pytest.raises(helm_python.HelmError, match="not both"):
        render(chart, {"sourceCredentials": credentials})


def test_basic_auth_needs_username(chart):
    credentials = {"basicAuth": {"secretName": "prometheus-basic-auth"}}

    with pytest.raises(helm_python.HelmError, match="basicAuth.username is missing"):
        render(chart, {"sourceCredentials": credentials})


# values.yaml documentation ------------------------------------------------------------------

# Keys whose children are Kubernetes objects or exporter configuration, documented by those.
PASS_THROUGH = {
    "source.headers",
    "detectors",
    "imagePullSecrets",
    "podSecurityContext",
    "securityContext",
    "resources",
    "livenessProbe",
    "readinessProbe",
    "networkPolicy.ingressFrom",
    "networkPolicy.egressTo",
    "networkPolicy.egressPorts",
    "serviceMonitor.labels",
    "prometheusRule.labels",
    "dashboards.labels",
    "persistence.accessModes",
}


def undocumented_keys(lines: list[str]) -> list[str]:
    """Return the dotted keys of values.yaml without a comment line right above them."""
    missing = []
    parents: list[tuple[int, str]] = []
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("-"):
            continue
        indent = len(line) - len(line.lstrip())
        while parents and parents[-1][0] >= indent:
            parents.pop()
        key = stripped.split(":", 1)[0]
        path = ".".join([name for _, name in parents] + [key])
        inside_pass_through = any(path.startswith(prefix + ".") for prefix in PASS_THROUGH)
        if not inside_pass_through and not lines[number - 1].strip().startswith("#"):
            missing.append(path)
        parents.append((indent, key))
    return missing


def test_values_documented():
    lines = (CHART_DIR / "values.yaml").read_text(encoding="utf-8").splitlines()

    assert undocumented_keys(lines) == []


def test_documentation_check_flags_gap():
    # Guards test_values_documented: a key without a comment must be listed.
    lines = ["# Documented.", "shards: 1", "image:", "  # Documented.", "  tag: x"]

    assert undocumented_keys(lines) == ["image"]


# Dockerfile ----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")
    instructions = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, argument = line.strip().partition(" ")
            instructions.append((keyword.upper(), argument.strip()))
    return instructions


def test_dockerfile_base_pinned():
    bases = [argument for keyword, argument in dockerfile_instructions() if keyword == "FROM"]

    assert bases == ["python:3.11-slim"]


def test_dockerfile_user_not_root():
    users = [argument for keyword, argument in dockerfile_instructions() if keyword == "USER"]

    assert users[-1].split(":")[0] == "10001"


def test_dockerfile_entrypoint():
    entrypoints = [argument for keyword, argument in dockerfile_instructions() if keyword == "ENTRYPOINT"]

    assert json.loads(entrypoints[-1]) == ["anomaly-exporter", "run"]


def test_chart_user_matches_image(chart):
    pod = one(objects(render(chart)), "StatefulSet")["spec"]["template"]["spec"]
    users = [argument for keyword, argument in dockerfile_instructions() if keyword == "USER"]

    assert str(pod["securityContext"]["runAsUser"]) == users[-1].split(":")[0]
