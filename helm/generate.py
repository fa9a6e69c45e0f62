"""Write the generated files of the Helm chart in helm/anomaly-exporter/.

Helm reads only files inside the chart folder, so the chart keeps copies of what other parts
of the repository own:

- ``templates/_rules.tpl``: the rule groups of rules/render.py, with every threshold, duration,
  severity and link replaced by a template that reads the ``rules`` values. The defaults in
  values.yaml reproduce rules/anomaly-exporter.rules.yml.
- ``dashboards/*.json``: the Grafana dashboards of grafana/dashboards/, byte for byte.
- the detector type enum in ``values.schema.json``, from the detector registry.

``python -m helm.generate`` rewrites them, and ``--check`` exits with status 1 when any of
them is out of date. tests/test_helm.py runs the same check.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from detectors import detector_type_names
from rules.render import RuleParameters, _RulesDumper, render_rule_groups

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = REPO_ROOT / "helm" / "anomaly-exporter"
RULES_TEMPLATE_PATH = CHART_DIR / "templates" / "_rules.tpl"
SCHEMA_PATH = CHART_DIR / "values.schema.json"
CHART_DASHBOARD_DIR = CHART_DIR / "dashboards"
SOURCE_DASHBOARD_DIR = REPO_ROOT / "grafana" / "dashboards"

RULE_GROUPS_TEMPLATE = "anomaly-exporter.ruleGroups"

# A ConfigMap data key, which each dashboard's file name becomes.
_CONFIGMAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")

# The seconds of modelsStaleAfter, for the PromQL comparison. Go templates accept backquoted
# strings, which keeps double quotes out of the YAML scalars that hold these templates.
_MODELS_STALE_SECONDS = "{{ include `anomaly-exporter.durationSeconds` .Values.rules.modelsStaleAfter }}"


def _value(key: str) -> str:
    return "{{ .Values.rules.%s }}" % key


def chart_rule_parameters() -> RuleParameters:
    """Return rule parameters whose values are Helm templates reading the chart values."""
    return RuleParameters(
        evaluation_interval=_value("evaluationInterval"),
        exporter_job="{{ .Values.scrapeJob }}",
        runbook_base_url="{{ .Values.rules.runbookBaseUrl | trimSuffix `/` }}",
        grafana_base_url="{{ .Values.rules.grafanaBaseUrl | trimSuffix `/` }}",
        warning_score=_value("warningScore"),
        warning_for=_value("warningFor"),
        critical_score=_value("criticalScore"),
        critical_for=_value("criticalFor"),
        escalation_window=_value("escalationWindow"),
        peer_warning_score=_value("peerWarningScore"),
        peer_warning_for=_value("peerWarningFor"),
        peer_critical_score=_value("peerCriticalScore"),
        peer_critical_for=_value("peerCriticalFor"),
        noisy_neighbor_for=_value("noisyNeighborFor"),
        noisy_neighbor_critical_for=_value("noisyNeighborCriticalFor"),
        equipment_fault_warning_score=_value("equipmentFaultWarningScore"),
        equipment_fault_warning_for=_value("equipmentFaultWarningFor"),
        equipment_fault_critical_score=_value("equipmentFaultCriticalScore"),
        equipment_fault_critical_for=_value("equipmentFaultCriticalFor"),
        exporter_down_for=_value("exporterDownFor"),
        exporter_down_severity=_value("exporterDownSeverity"),
        detector_failing_window=_value("detectorFailingWindow"),
        detector_failing_for=_value("detectorFailingFor"),
        detector_failing_severity=_value("detectorFailingSeverity"),
        models_stale_after_seconds=_MODELS_STALE_SECONDS,
        models_stale_for=_value("modelsStaleFor"),
        models_stale_severity=_value("modelsStaleSeverity"),
        source_down_for=_value("sourceDownFor"),
        source_down_severity=_value("sourceDownSeverity"),
        # Helm outputs a backquoted string unchanged, so Prometheus gets its own {{ }} actions.
        template_open="{{`{{",
        template_close="}}`}}",
    )


def _use_duration_in_description(groups: dict) -> None:
    """Show modelsStaleAfter as written (6h) in AnomalyModelsStale's description.

    render.py writes a templated limit as "<template>s", which would read 21600s where the
    rule file reads 6h.
    """
    seconds_text = _MODELS_STALE_SECONDS + "s"
    replaced = 0
    for group in groups["groups"]:
        for rule in group["rules"]:
            description = rule.get("annotations", {}).get("description", "")
            if rule.get("alert") == "AnomalyModelsStale" and seconds_text in description:
                rule["annotations"]["description"] = description.replace(seconds_text, _value("modelsStaleAfter"))
                replaced += 1
    if replaced != 1:
        raise RuntimeError(
            f"expected the limit {seconds_text!r} once in AnomalyModelsStale's description, found it "
            f"{replaced} times: update helm/generate.py to the rule text of rules/render.py"
        )


def render_rules_template() -> str:
    """Return the text of templates/_rules.tpl: the rule groups as a named Helm template."""
    groups = render_rule_groups(chart_rule_parameters())
    _use_duration_in_description(groups)
    # The dumper of rules/render.py, so that the chart's copy has the layout of the rule file.
    body = yaml.dump(groups, Dumper=_RulesDumper, sort_keys=False, allow_unicode=True, width=10_000)
    return (
        "{{- /*\n"
        "Generated by `python -m helm.generate` from rules/render.py. Do not edit: change\n"
        "rules/render.py or helm/generate.py and regenerate. tests/test_helm.py fails when this\n"
        "file is out of date.\n"
        "*/ -}}\n"
        f'{{{{- define "{RULE_GROUPS_TEMPLATE}" -}}}}\n'
        f"{body}"
        "{{- end }}\n"
    )


def render_schema() -> str:
    """Return values.schema.json with the detector type enum set to the registered types."""
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    schema["$defs"]["detector"]["properties"]["type"]["enum"] = list(detector_type_names())
    return json.dumps(schema, indent=2) + "\n"


def source_dashboards() -> dict[str, bytes]:
    """Return the dashboard files of grafana/dashboards/ by file name, or none when the folder is missing."""
    if not SOURCE_DASHBOARD_DIR.is_dir():
        return {}
    dashboards = {}
    for path in sorted(SOURCE_DASHBOARD_DIR.glob("*.json")):
        if not _CONFIGMAP_KEY.match(path.name):
            raise ValueError(
                f"invalid dashboard file name {path.name!r}: a ConfigMap key allows only letters, digits, '-', '_' and '.'"
            )
        dashboards[path.name] = path.read_bytes()
    return dashboards


def expected_files() -> dict[Path, bytes]:
    """Return the content each generated file of the chart must have."""
    files = {
        RULES_TEMPLATE_PATH: render_rules_template().encode("utf-8"),
        SCHEMA_PATH: render_schema().encode("utf-8"),
    }
    for name, data in source_dashboards().items():
        files[CHART_DASHBOARD_DIR / name] = data
    return files


def stale_dashboards() -> list[Path]:
    """Return the chart's dashboard copies whose source file no longer exists."""
    sources = set(source_dashboards())
    return sorted(path for path in CHART_DASHBOARD_DIR.glob("*.json") if path.name not in sources)


def out_of_date() -> list[Path]:
    """Return the generated files that differ from a fresh generation, or should not exist."""
    changed = [path for path, data in expected_files().items() if not path.is_file() or path.read_bytes() != data]
    return changed + stale_dashboards()


def write() -> list[Path]:
    """Write every generated file that changed, remove stale dashboards, and return their paths."""
    changed = []
    CHART_DASHBOARD_DIR.mkdir(exist_ok=True)
    for path, data in expected_files().items():
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)
            changed.append(path)
    for path in stale_dashboards():
        path.unlink()
        changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helm.generate",
        description="Write the chart's copies of the alert rules, the dashboards and the detector types.",
    )
    parser.add_argument("--check", action="store_true", help="only report out-of-date files; exit 1 if any")
    args = parser.parse_args(argv)

    if args.check:
        stale = out_of_date()
        for path in stale:
            print(f"out of date: {path.relative_to(REPO_ROOT)}", file=sys.stderr)
        if stale:
            print("run `python -m helm.generate` to update them", file=sys.stderr)
        return 1 if stale else 0

    for path in write():
        print(f"updated {path.relative_to(REPO_ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
