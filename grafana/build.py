"""Build the Grafana dashboards of anomaly-exporter and write them as JSON.

``python -m grafana.build`` writes ``grafana/dashboards/<uid>.json`` for every dashboard in
``DASHBOARDS``. With ``--check`` it writes nothing and exits with status 1 when a committed
file differs from a fresh build. The files are deterministic (sorted keys, panel ids in layout
order), so tests/test_dashboards.py can compare them byte for byte.

The uids and titles are part of the interface: the alert rules link to
``/d/anomaly-entity/anomaly-entity`` and ``/d/anomaly-exporter-health/anomaly-exporter-health``,
and Grafana derives the second part of those paths, the slug, from the title.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grafana.files import write_or_check
from grafana_foundation_sdk.builders import bargauge, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dashboard_builder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dashboard_model

from grafana.common import (
    CRITICAL_SCORE,
    DATASOURCE,
    SELECTED,
    WARNING_SCORE,
    RULE_DEFAULTS,
    dashboard_url_link,
    datasource_variable,
    dump,
    last_value,
    legend_list,
    new_dashboard,
    override,
    query,
    query_variable,
    score_thresholds,
    thresholds,
    to_document,
    tooltip_all_series,
    value_text,
    with_targets,
)

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"

ENTITY_UID = "anomaly-entity"
ENTITY_PATH = "/d/anomaly-entity/anomaly-entity"
OVERVIEW_PATH = "/d/anomaly-overview/anomaly-overview"

# The per-entity maximum score, recorded by rules/anomaly-exporter.rules.yml.
MAX_SCORE = f"detector_entity:anomaly_score:max{{{SELECTED}}}"
FIRING_ANOMALIES = 'ALERTS{alertname="AnomalyDetected", alertstate="firing", %s}'
SCORE_AXIS_MAX = CRITICAL_SCORE + 1

READY_MAPPING = {0: ("Warming up", "orange"), 1: ("Ready", "green")}
OUTLIER_MAPPING = {0: ("Inlier", "green"), 1: ("Outlier", "orange")}
UP_MAPPING = {0: ("Down", "red"), 1: ("Up", "green")}
OK_MAPPING = {0: ("Failing", "red"), 1: ("OK", "green")}


# --- panel shapes ------------------------------------------------------------------------------


def _stat(title: str, description: str, unit: str, steps: dashboard_builder.ThresholdsConfig) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .thresholds(steps)
        .reduce_options(last_value())
        .graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .text_mode(common.BigValueTextMode.AUTO)
        .height(4)
        .span(6)
    )


def _graph(title: str, description: str, unit: str, steps: dashboard_builder.ThresholdsConfig) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .thresholds(steps)
        .legend(legend_list())
        .tooltip(tooltip_all_series())
        .line_width(1)
        .fill_opacity(0)
        .show_points(common.VisibilityMode.NEVER)
        .height(8)
        .span(12)
    )


def _score_graph(title: str, description: str) -> timeseries.Panel:
    """Build a time series of scores with dashed lines at the warning and critical thresholds."""
    return (
        _graph(title, description, "none", score_thresholds())
        .thresholds_style(common_builder.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED))
        .min(0)
        .axis_soft_max(SCORE_AXIS_MAX)
        .decimals(2)
    )


def _table(title: str, description: str, unit: str, steps: dashboard_builder.ThresholdsConfig,
           value_name: str) -> table.Panel:
    """Build a table of one instant query in table format, without the time column and with the values renamed."""
    organize = dashboard_model.DataTransformerConfig(
        id_val="organize",
        options={"excludeByName": {"Time": True, "__name__": True}, "renameByName": {"Value": value_name}},
    )
    return (
        table.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .thresholds(steps)
        .with_transformation(organize)
        .sort_by([common_builder.TableSortByFieldState().display_name(value_name).desc(True)])
        .height(10)
        .span(12)
    )


def _entity_link(detector: str, entity: str) -> dashboard_builder.DashboardLink:
    return dashboard_url_link(
        "Open the entity dashboard", ENTITY_PATH, f"var-detector={detector}&var-entity={entity}"
    )


# Data links for series that carry detector and entity labels, and for table rows.
SERIES_ENTITY_LINK = _entity_link("${__field.labels.detector:percentencode}", "${__field.labels.entity:percentencode}")
ROW_ENTITY_LINK = _entity_link("${__data.fields.detector:percentencode}", "${__data.fields.entity:percentencode}")


def _entity_variables(dashboard: dashboard_builder.Dashboard, *, multi: bool) -> dashboard_builder.Dashboard:
    """Add the data source, detector and entity variables that every anomaly dashboard has."""
    detector_match = 'detector=~"$detector"' if multi else 'detector="$detector"'
    return (
        dashboard.with_variable(datasource_variable())
        .with_variable(query_variable("detector", "Detector", "label_values(anomaly_model_ready, detector)", multi=multi))
        .with_variable(
            query_variable("entity", "Entity", f"label_values(anomaly_model_ready{{{detector_match}}}, entity)", multi=multi)
        )
    )


# --- Overview ----------------------------------------------------------------------------------


def overview() -> dashboard_builder.Dashboard:
    """Build the overview: entities ranked by score, counts at each tier, firing alerts and series per state."""
    dashboard = _entity_variables(
        new_dashboard(
            "anomaly-overview",
            "Anomaly Overview",
            "Which entities deviate from their baseline now, ranked by score, with the alerts "
            "that fire for them. Click an entity to open its drill-down dashboard.",
        ),
        multi=True,
    )
    series_by_state = 'sum by (state) (anomaly_exporter_series{detector=~"$detector"})'

    dashboard = (
        dashboard.with_row(dashboard_builder.Row("Now"))
        .with_panel(with_targets(
            _stat(
                "Entities at or above warning",
                f"Entities whose highest score is at least {WARNING_SCORE:g}, the edge of the expected band. "
                f"AnomalyDetected fires as a warning once a series stays there for {RULE_DEFAULTS.warning_for}.",
                "none",
                thresholds((None, "green"), (1, "orange")),
            ),
            query(f"count({MAX_SCORE} >= {WARNING_SCORE:g}) or vector(0)", "entities", instant=True),
        ))
        .with_panel(with_targets(
            _stat(
                "Entities at or above critical",
                f"Entities whose highest score is at least {CRITICAL_SCORE:g}, twice as far from the baseline "
                f"as the band edge. AnomalyDetected fires as critical once a series stays there for "
                f"{RULE_DEFAULTS.critical_for}.",
                "none",
                thresholds((None, "green"), (1, "red")),
            ),
            query(f"count({MAX_SCORE} >= {CRITICAL_SCORE:g}) or vector(0)", "entities", instant=True),
        ))
        .with_panel(with_targets(
            _stat(
                "Firing anomaly alerts",
                "AnomalyDetected alerts that Prometheus fires now, by severity.",
                "none",
                thresholds((None, "green"), (1, "red")),
            ).no_value("0"),
            query(f"count by (severity) ({FIRING_ANOMALIES % SELECTED})", "{{severity}}", instant=True),
        ))
        .with_panel(with_targets(
            _stat(
                "Input series by state",
                "Input series of the selected detectors: ready (scored), warming (less history than "
                "min_history) and stale (no sample within stale_after).",
                "none",
                thresholds((None, "blue")),
            ).color_mode(common.BigValueColorMode.VALUE),
            query(series_by_state, "{{state}}", instant=True),
        ))
        .with_row(dashboard_builder.Row("Ranking"))
        .with_panel(with_targets(
            _table(
                "Entities by current max score",
                "Every scored entity with the highest score among its series, highest first. "
                "Click an entity to open its drill-down dashboard.",
                "none",
                score_thresholds(),
                "Max score",
            )
            .decimals(2)
            .override_by_name(*override("Max score", {"custom.cellOptions": {"type": "color-background"}}))
            .override_by_name(*override("entity", {"links": [ROW_ENTITY_LINK.build()]})),
            query(MAX_SCORE, instant=True, table=True),
        ))
        .with_panel(with_targets(
            bargauge.Panel()
            .title("Top 10 entities by max score")
            .description("The ten entities with the highest current score, colored by alert tier.")
            .unit("none")
            .decimals(2)
            .min(0)
            .max(SCORE_AXIS_MAX)
            .thresholds(score_thresholds())
            .display_mode(common.BarGaugeDisplayMode.GRADIENT)
            .orientation(common.VizOrientation.HORIZONTAL)
            .reduce_options(last_value())
            .data_links([SERIES_ENTITY_LINK])
            .height(10)
            .span(12),
            query(f"topk(10, {MAX_SCORE})", "{{detector}} {{entity}}", instant=True),
        ))
        .with_row(dashboard_builder.Row("History"))
        .with_panel(with_targets(
            _score_graph(
                "Max score per entity",
                f"The highest score of each entity over time. Dashed lines mark warning ({WARNING_SCORE:g}) "
                f"and critical ({CRITICAL_SCORE:g}).",
            ).data_links([SERIES_ENTITY_LINK]),
            query(MAX_SCORE, "{{detector}} {{entity}}"),
        ))
        .with_panel(with_targets(
            _graph(
                "Firing anomaly alerts by severity",
                "Number of firing AnomalyDetected alerts over time.",
                "none",
                thresholds((None, "green"), (1, "red")),
            ).min(0).decimals(0),
            query(f"count by (severity) ({FIRING_ANOMALIES % SELECTED})", "{{severity}}"),
        ))
        .with_panel(with_targets(
            _graph(
                "Input series by state",
                "Input series of the selected detectors by state, stacked.",
                "none",
                thresholds((None, "blue")),
            )
            .stacking(common_builder.StackingConfig().mode(common.StackingMode.NORMAL))
            .fill_opacity(30)
            .min(0)
            .decimals(0),
            query(series_by_state, "{{state}}"),
        ))
    )
    return dashboard


# --- Entity drill-down -------------------------------------------------------------------------

ENTITY = 'detector="$detector", entity="$entity"'


def entity() -> dashboard_builder.Dashboard:
    """Build the drill-down of one entity: baseline and band, score, contributions and model state."""
    dashboard = _entity_variables(
        new_dashboard(
            ENTITY_UID,
            "Anomaly Entity",
            "One entity of one detector: its expected value and band, its score against the alert "
            "thresholds, the contribution of each metric and whether its model is ready. The alert "
            "rules link here with the detector and entity of the alert.",
            time_from="now-24h",
        ).annotation(
            dashboard_builder.AnnotationQuery()
            .name("Firing anomaly alerts")
            .datasource(DATASOURCE)
            .enable(True)
            .icon_color("red")
            .expr(FIRING_ANOMALIES % ENTITY)
        ),
        multi=False,
    )
    band_description = (
        "The baseline (anomaly_expected) and the band from anomaly_lower to anomaly_upper, inside which "
        "the score stays below 1, in the unit of the detector's input. The exporter does not export the "
        "observed input value: it is the result of the detector's query in the exporter configuration. "
        "To compare, edit this panel and add that query as another series. Set the panel unit to the "
        "input's unit."
    )
    # NOTE: the legends are fixed names because the band override refers to the series "upper" and
    # "lower". An entity whose detector query returns several series shows several lines per name,
    # and the band is filled only for the first pair.
    band = (
        _graph("Expected value and band", band_description, "short", thresholds((None, "green")))
        .override_by_name(*override("expected", {
            "color": {"mode": "fixed", "fixedColor": "blue"}, "custom.lineWidth": 2,
        }))
        .override_by_name(*override("upper", {
            "color": {"mode": "fixed", "fixedColor": "green"}, "custom.lineWidth": 0,
            "custom.fillBelowTo": "lower", "custom.fillOpacity": 20,
        }))
        .override_by_name(*override("lower", {
            "color": {"mode": "fixed", "fixedColor": "green"}, "custom.lineWidth": 0,
        }))
    )
    firing = FIRING_ANOMALIES % ENTITY

    dashboard = (
        dashboard.with_row(dashboard_builder.Row("Now"))
        .with_panel(with_targets(
            _stat(
                "Current score",
                f"The newest anomaly_score: 0 as expected, {WARNING_SCORE:g} at the band edge (warning), "
                f"{CRITICAL_SCORE:g} critical. Absent while the model warms up or the input is stale.",
                "none",
                score_thresholds(),
            ).decimals(2),
            query(f"anomaly_score{{{ENTITY}}}", "score", instant=True),
        ))
        .with_panel(with_targets(
            _stat(
                "Expected value",
                "The newest anomaly_expected, in the unit of the detector's input.",
                "short",
                thresholds((None, "blue")),
            ).color_mode(common.BigValueColorMode.VALUE),
            query(f"anomaly_expected{{{ENTITY}}}", "expected", instant=True),
        ))
        .with_panel(with_targets(
            _stat(
                "Model",
                "Ready once the series had min_history of data at the last fit; warming up before.",
                "none",
                thresholds((None, "orange"), (1, "green")),
            ).mappings(value_text(READY_MAPPING)),
            query(f"anomaly_model_ready{{{ENTITY}}}", "model", instant=True),
        ))
        .with_panel(with_targets(
            _stat(
                "Firing alerts",
                "AnomalyDetected alerts that fire now for this entity, by severity.",
                "none",
                thresholds((None, "green"), (1, "red")),
            ).no_value("None"),
            query(f"count by (severity) ({firing})", "{{severity}}", instant=True),
        ))
        .with_row(dashboard_builder.Row("Baseline and score"))
        .with_panel(with_targets(
            band,
            query(f"anomaly_expected{{{ENTITY}}}", "expected"),
            query(f"anomaly_lower{{{ENTITY}}}", "lower"),
            query(f"anomaly_upper{{{ENTITY}}}", "upper"),
        ))
        .with_panel(with_targets(
            _score_graph(
                "Anomaly score",
                f"The score over time. AnomalyDetected fires as a warning after {RULE_DEFAULTS.warning_for} at "
                f"or above {WARNING_SCORE:g} and as critical after {RULE_DEFAULTS.critical_for} at or above "
                f"{CRITICAL_SCORE:g}, or after {RULE_DEFAULTS.escalation_window} at or above {WARNING_SCORE:g}.",
            ),
            query(f"anomaly_score{{{ENTITY}}}", "score"),
        ))
        .with_row(dashboard_builder.Row("Explanation"))
        .with_panel(with_targets(
            _graph(
                "Contribution per metric",
                "Share of the score that each input metric contributes (anomaly_contribution_ratio, the metric "
                "in the feature label), stacked. The tenant and equipment detector types export it.",
                "percentunit",
                thresholds((None, "green")),
            )
            .stacking(common_builder.StackingConfig().mode(common.StackingMode.NORMAL))
            .fill_opacity(40)
            .min(0)
            .max(1),
            query(f"anomaly_contribution_ratio{{{ENTITY}}}", "{{feature}}"),
        ))
        .with_panel(with_targets(
            statetimeline.Panel()
            .title("Model state")
            .description("anomaly_model_ready over time: warming up until the series has min_history of data.")
            .unit("none")
            .thresholds(thresholds((None, "orange"), (1, "green")))
            .mappings(value_text(READY_MAPPING))
            .height(8)
            .span(12),
            query(f"anomaly_model_ready{{{ENTITY}}}", "model"),
        ))
    )
    return dashboard


# --- Tenants and peer groups -------------------------------------------------------------------


def tenants() -> dashboard_builder.Dashboard:
    """Build the tenants dashboard: scores, peer groups, noisy neighbours and anomaly types.

    Every panel except the first reads a family that only the ``tenant`` detector type exports.
    """
    dashboard = _entity_variables(
        new_dashboard(
            "anomaly-tenants",
            "Anomaly Tenants",
            "Tenants of the tenant detector type: their scores against their own baselines and "
            "against their peer group, noisy neighbours on shared nodes and the type of each anomaly.",
        ),
        multi=True,
    )
    peer_group = f"max by (detector, entity) (anomaly_peer_group{{{SELECTED}}})"
    noisy = f"anomaly_noisy_neighbor{{{SELECTED}}} == 1"

    dashboard = (
        dashboard.with_row(dashboard_builder.Row("Scores"))
        .with_panel(with_targets(
            _score_graph(
                "Anomaly score per tenant",
                "The highest score of each entity against its own baseline. For a tenant detector it is the "
                "largest of its metrics' scores.",
            ).data_links([SERIES_ENTITY_LINK]),
            query(MAX_SCORE, "{{detector}} {{entity}}"),
        ))
        .with_panel(with_targets(
            _score_graph(
                "Multivariate score per tenant",
                "How unusual each tenant's vector of metric deviations is (anomaly_multivariate_score): the "
                "larger of the score of an IsolationForest that the detector shares between all its tenants "
                "and the score of the calibrated sum of the deviations. It is on the scale of anomaly_score: "
                f"{WARNING_SCORE:g} at the warning edge, {CRITICAL_SCORE:g} critical. It reacts to moderate "
                "deviations of several metrics at once that no single metric's band catches. No alert rule "
                "reads it.",
            ).data_links([SERIES_ENTITY_LINK]),
            query(f"max by (detector, entity) (anomaly_multivariate_score{{{SELECTED}}})", "{{detector}} {{entity}}"),
        ))
        .with_row(dashboard_builder.Row("Peer groups"))
        .with_panel(with_targets(
            _score_graph(
                "Peer score per tenant",
                "How far each entity's current change from its own typical level deviates from the changes "
                "of the other tenants in its peer group (anomaly_peer_score), on the scale of "
                f"anomaly_score: {WARNING_SCORE:g} at the band edge, {CRITICAL_SCORE:g} critical. Tenants in "
                "a group smaller than the detector's peers.min_group_size have none.",
            ).data_links([SERIES_ENTITY_LINK]),
            query(f"max by (detector, entity) (anomaly_peer_score{{{SELECTED}}})", "{{detector}} {{entity}}"),
        ))
        .with_panel(with_targets(
            statetimeline.Panel()
            .title("Peer outliers")
            .description(
                "anomaly_peer_outlier over time: Outlier while the IsolationForest over every tenant's "
                "deviations from its peer group flags the tenant, Inlier otherwise. It has values for the "
                "tenants that have a peer score."
            )
            .unit("none")
            .thresholds(thresholds((None, "green"), (1, "orange")))
            .mappings(value_text(OUTLIER_MAPPING))
            .height(8)
            .span(12),
            query(f"max by (detector, entity) (anomaly_peer_outlier{{{SELECTED}}})", "{{detector}} {{entity}}"),
        ))
        .with_panel(with_targets(
            _table(
                "Peer group per tenant",
                "The peer group id of each entity (the value of anomaly_peer_group). A refit keeps the id "
                "of a group that it finds again.",
                "none",
                thresholds((None, "text")),
                "Peer group",
            ).decimals(0),
            query(peer_group, instant=True, table=True),
        ))
        .with_panel(with_targets(
            bargauge.Panel()
            .title("Tenants per peer group")
            .description("Number of entities in each peer group, per detector.")
            .unit("none")
            .decimals(0)
            .min(0)
            .thresholds(thresholds((None, "blue")))
            .display_mode(common.BarGaugeDisplayMode.BASIC)
            .orientation(common.VizOrientation.HORIZONTAL)
            .reduce_options(last_value())
            .height(10)
            .span(12),
            query(f'count_values by (detector) ("peer_group", {peer_group})', "{{detector}} group {{peer_group}}",
                  instant=True),
        ))
        .with_row(dashboard_builder.Row("Noisy neighbours"))
        .with_panel(with_targets(
            _table(
                "Noisy neighbours now",
                "Tenants whose load is above their band while their node's CPU or memory utilisation is at or "
                "above the stress ratio (0.85 by default) and other tenants on the node are degraded (role "
                "noisy), and those degraded tenants, with latency above or request rate below their band "
                "(role affected). The tenant column holds the tenant's entity label values. A finding lasts "
                "while it holds within the detector's noisy_window (30m by default).",
                "none",
                thresholds((None, "text")),
                "Flag",
            ).override_by_name(*override("Flag", {"custom.hidden": True})),
            query(f"max by (node, tenant, role) ({noisy})", instant=True, table=True),
        ))
        .with_panel(with_targets(
            _graph(
                "Noisy and affected tenants per node",
                "Number of tenants flagged noisy or affected on each node over time.",
                "none",
                thresholds((None, "green"), (1, "orange")),
            ).min(0).decimals(0),
            query(f"count by (node, role) ({noisy})", "{{node}} {{role}}"),
        ))
        .with_row(dashboard_builder.Row("Anomaly types"))
        .with_panel(with_targets(
            _table(
                "Current anomaly type per tenant",
                "The type of each entity's current anomaly (the type label of anomaly_type), present while "
                "its score is at least 1: resource_exhaustion (CPU and memory high), network_spike (network "
                "in or out high), cpu_spike (CPU high) or behavioural (any other deviation).",
                "none",
                thresholds((None, "text")),
                "Flag",
            ).override_by_name(*override("Flag", {"custom.hidden": True})),
            query(f"max by (detector, entity, type) (anomaly_type{{{SELECTED}}} == 1)", instant=True, table=True),
        ))
        .with_panel(with_targets(
            _graph(
                "Tenants per anomaly type",
                "Number of entities with a current anomaly of each type over time.",
                "none",
                thresholds((None, "green"), (1, "orange")),
            ).min(0).decimals(0),
            query(f"count by (type) (anomaly_type{{{SELECTED}}} == 1)", "{{type}}"),
        ))
    )
    return dashboard


# --- Equipment health --------------------------------------------------------------------------


def equipment() -> dashboard_builder.Dashboard:
    """Build the equipment dashboard: status per machine, sensor contributions and fault scores."""
    dashboard = _entity_variables(
        new_dashboard(
            "anomaly-equipment",
            "Anomaly Equipment",
            "Machines and their sensors: the status of each machine from its highest score, which "
            "sensors drive an anomaly and the score of each known fault. Select the detectors that "
            "watch your machines.",
        ),
        multi=True,
    )
    machine_score = f"max by (entity) ({MAX_SCORE})"
    fault_score = f"max by (entity, fault, bearing) (anomaly_equipment_fault{{{SELECTED}}})"
    fault_scale = (
        f"on the scale of anomaly_score: {WARNING_SCORE:g} when the amplitude at the fault's order of the shaft "
        f"speed is 2 baseline standard deviations (of its logarithm) above its healthy mean, {CRITICAL_SCORE:g} "
        "at 3. The faults are imbalance (1x), misalignment (2x) and, per configured bearing, bearing_outer and "
        "bearing_inner"
    )

    dashboard = (
        dashboard.with_row(dashboard_builder.Row("Status"))
        .with_panel(with_targets(
            _stat(
                "Status per machine",
                f"The highest score of each machine across the selected detectors: green below "
                f"{WARNING_SCORE:g}, orange from {WARNING_SCORE:g} (warning), red from {CRITICAL_SCORE:g} (critical).",
                "none",
                score_thresholds(),
            ).decimals(2).span(24).data_links([
                dashboard_url_link(
                    "Open the overview of this machine", OVERVIEW_PATH, "var-entity=${__field.labels.entity:percentencode}"
                )
            ]),
            query(machine_score, "{{entity}}", instant=True),
        ))
        .with_panel(with_targets(
            statetimeline.Panel()
            .title("Status history")
            .description("The highest score of each machine over time, colored by alert tier.")
            .unit("none")
            .decimals(2)
            .thresholds(score_thresholds())
            .color_scheme(dashboard_builder.FieldColor().mode(dashboard_model.FieldColorModeId.THRESHOLDS))
            .show_value(common.VisibilityMode.NEVER)
            .height(8)
            .span(24),
            query(machine_score, "{{entity}}"),
        ))
        .with_row(dashboard_builder.Row("Sensors and faults"))
        .with_panel(with_targets(
            _graph(
                "Sensor contributions",
                "Share of each machine's score that each sensor contributes (anomaly_contribution_ratio, "
                "the sensor in the feature label). The shares of a machine add up to 1.",
                "percentunit",
                thresholds((None, "green")),
            ).min(0).max(1),
            query(f"max by (entity, feature) (anomaly_contribution_ratio{{{SELECTED}}})", "{{entity}} {{feature}}"),
        ))
        .with_panel(with_targets(
            bargauge.Panel()
            .title("Fault scores now")
            .description(f"The current score of each fault per machine (anomaly_equipment_fault), {fault_scale}.")
            .unit("none")
            .decimals(2)
            .min(0)
            .max(SCORE_AXIS_MAX)
            .thresholds(score_thresholds())
            .display_mode(common.BarGaugeDisplayMode.GRADIENT)
            .orientation(common.VizOrientation.HORIZONTAL)
            .reduce_options(last_value())
            .height(8)
            .span(12),
            query(fault_score, "{{entity}} {{fault}} {{bearing}}", instant=True),
        ))
        .with_panel(with_targets(
            _score_graph(
                "Fault scores",
                f"The score of each fault per machine over time (anomaly_equipment_fault), {fault_scale}. "
                "EquipmentFault alerts fire on these scores.",
            ).span(24),
            query(fault_score, "{{entity}} {{fault}} {{bearing}}"),
        ))
    )
    return dashboard


# --- Exporter health ---------------------------------------------------------------------------

JOB = 'job="$job"'
JOB_DETECTOR = 'job="$job", detector=~"$detector"'
STALE_SECONDS = float(RULE_DEFAULTS.models_stale_after_seconds)


def exporter_health() -> dashboard_builder.Dashboard:
    """Build the exporter's self-monitoring dashboard: runs, failures, series, models, source and config."""
    dashboard = (
        new_dashboard(
            "anomaly-exporter-health",
            "Anomaly Exporter Health",
            "Self-monitoring of anomaly-exporter: scheduled runs and their durations, failures, input "
            "series by state, model age, the query API, dropped series and configuration reloads. The "
            "self-monitoring alerts link here.",
        )
        .with_variable(datasource_variable())
        .with_variable(query_variable("job", "Job", "label_values(anomaly_exporter_build_info, job)", multi=False))
        .with_variable(query_variable(
            "detector", "Detector", f"label_values(anomaly_exporter_runs_total{{{JOB}}}, detector)", multi=True
        ))
    )
    duration = "anomaly_exporter_run_duration_seconds"

    dashboard = (
        dashboard.with_row(dashboard_builder.Row("Status"))
        .with_panel(with_targets(
            _stat("Exporter targets", "Whether Prometheus scrapes each exporter target (up).", "none",
                  thresholds((None, "red"), (1, "green"))).mappings(value_text(UP_MAPPING)).span(5),
            query(f"up{{{JOB}}}", "{{instance}}", instant=True),
        ))
        .with_panel(with_targets(
            _stat("Query API", "anomaly_exporter_source_up: whether the last request to the query API got an "
                  "answer other than 5xx.", "none",
                  thresholds((None, "red"), (1, "green"))).mappings(value_text(UP_MAPPING)).span(5),
            query(f"anomaly_exporter_source_up{{{JOB}}}", "{{instance}}", instant=True),
        ))
        .with_panel(with_targets(
            _stat("Last config reload", "Whether the last configuration load succeeded. A rejected reload keeps "
                  "the running configuration.", "none",
                  thresholds((None, "red"), (1, "green"))).mappings(value_text(OK_MAPPING)).span(5),
            query(f"anomaly_exporter_config_last_reload_successful{{{JOB}}}", "{{instance}}", instant=True),
        ))
        .with_panel(with_targets(
            _stat("Time since config load", "Time since the last successful configuration load.", "s",
                  thresholds((None, "blue"))).color_mode(common.BigValueColorMode.VALUE).span(5),
            query(f"time() - anomaly_exporter_config_last_reload_success_timestamp_seconds{{{JOB}}}", "{{instance}}",
                  instant=True),
        ))
        .with_panel(with_targets(
            _stat("Version", "The exporter version of each target.", "none", thresholds((None, "blue")))
            .color_mode(common.BigValueColorMode.NONE).text_mode(common.BigValueTextMode.NAME).span(4),
            query(f"anomaly_exporter_build_info{{{JOB}}}", "{{version}}", instant=True),
        ))
        .with_row(dashboard_builder.Row("Runs"))
        .with_panel(with_targets(
            _graph("Runs by result", "Scheduled fit and score runs per second, by detector, phase and result.",
                   "ops", thresholds((None, "green")))
            .override_by_regexp(".* failure", [dashboard_model.DynamicConfigValue(
                id_val="color", value={"mode": "fixed", "fixedColor": "red"})]),
            query(f"sum by (detector, phase, result) (rate(anomaly_exporter_runs_total{{{JOB_DETECTOR}}}[$__rate_interval]))",
                  "{{detector}} {{phase}} {{result}}"),
        ))
        .with_panel(with_targets(
            _graph("Failed runs", "Failed fit and score runs in each interval. The exporter log has the error of "
                   "each failure. AnomalyDetectorFailing fires when a phase has only failures for "
                   f"{RULE_DEFAULTS.detector_failing_window}.", "none",
                   thresholds((None, "green"), (1, "red")))
            .thresholds_style(common_builder.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED))
            .min(0),
            query(f'sum by (detector, phase) (increase(anomaly_exporter_runs_total{{{JOB_DETECTOR}, result="failure"}}'
                  "[$__rate_interval]))", "{{detector}} {{phase}}"),
        ))
        .with_panel(with_targets(
            _graph("Score run duration", "Quantiles of the score run duration, query time included.", "s",
                   thresholds((None, "green"))).min(0),
            *(
                query(f"histogram_quantile({quantile}, sum by (le, detector) (rate({duration}_bucket"
                      f'{{{JOB_DETECTOR}, phase="score"}}[$__rate_interval])))', f"{{{{detector}}}} p{label}")
                for quantile, label in ((0.5, "50"), (0.9, "90"), (0.99, "99"))
            ),
        ))
        .with_panel(with_targets(
            _graph("Fit run duration", "Mean duration of the fits that ended in the previous 2h, query time "
                   "included. Each detector fits once per fit_every (1h by default), so shorter windows are "
                   "empty between fits.", "s", thresholds((None, "green"))).min(0),
            query(f'sum by (detector) (increase({duration}_sum{{{JOB_DETECTOR}, phase="fit"}}[2h]))'
                  f' / sum by (detector) (increase({duration}_count{{{JOB_DETECTOR}, phase="fit"}}[2h]))',
                  "{{detector}} mean"),
        ))
        .with_panel(with_targets(
            _graph("Time since last successful run", "Per detector and phase. AnomalyModelsStale fires when "
                   f"the last successful fit is older than {STALE_SECONDS:g}s.", "s",
                   thresholds((None, "green"), (STALE_SECONDS, "red")))
            .thresholds_style(common_builder.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED))
            .min(0)
            .span(24),
            query(f"time() - anomaly_exporter_last_success_timestamp_seconds{{{JOB_DETECTOR}}}",
                  "{{detector}} {{phase}}"),
        ))
        .with_row(dashboard_builder.Row("Series and models"))
        .with_panel(with_targets(
            _graph("Input series by state", "Input series per detector: ready (scored), warming (less history "
                   "than min_history) and stale (no sample within stale_after).", "none", thresholds((None, "blue")))
            .min(0)
            .decimals(0),
            query(f"sum by (detector, state) (anomaly_exporter_series{{{JOB_DETECTOR}}})", "{{detector}} {{state}}"),
        ))
        .with_panel(with_targets(
            _graph("Model age", "Seconds since the end of the data that each detector's current model was "
                   "fitted on.", "s", thresholds((None, "green"), (STALE_SECONDS, "red")))
            .thresholds_style(common_builder.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED))
            .min(0),
            query(f"anomaly_exporter_model_age_seconds{{{JOB_DETECTOR}}}", "{{detector}}"),
        ))
        .with_panel(with_targets(
            _graph("Dropped series", "Input series left out of runs in each interval, by reason: max_series "
                   "(over the detector's limit), missing_entity_label, duplicate or label_collision.", "none",
                   thresholds((None, "green"), (1, "orange")))
            .no_value("No series dropped")
            .min(0),
            query(f"sum by (detector, reason) (increase(anomaly_exporter_series_dropped_total{{{JOB_DETECTOR}}}"
                  "[$__rate_interval]))", "{{detector}} {{reason}}"),
        ))
        .with_panel(with_targets(
            statetimeline.Panel()
            .title("Query API and config reload")
            .description("anomaly_exporter_source_up and anomaly_exporter_config_last_reload_successful over time.")
            .unit("none")
            .thresholds(thresholds((None, "red"), (1, "green")))
            .mappings(value_text(OK_MAPPING))
            .height(8)
            .span(12),
            query(f"anomaly_exporter_source_up{{{JOB}}}", "query API {{instance}}"),
            query(f"anomaly_exporter_config_last_reload_successful{{{JOB}}}", "config reload {{instance}}"),
        ))
    )
    return dashboard


# --- output ------------------------------------------------------------------------------------

DASHBOARDS: dict[str, Callable[[], dashboard_builder.Dashboard]] = {
    "anomaly-overview": overview,
    "anomaly-entity": entity,
    "anomaly-tenants": tenants,
    "anomaly-equipment": equipment,
    "anomaly-exporter-health": exporter_health,
}


def build_documents() -> dict[str, dict[str, Any]]:
    """Build every dashboard and return its JSON document by uid."""
    documents = {}
    for uid, build in DASHBOARDS.items():
        document = to_document(build())
        if document["uid"] != uid:
            raise ValueError(f"dashboard {build.__name__} has uid {document['uid']!r}, expected {uid!r}")
        documents[uid] = document
    return documents


def render_files() -> dict[str, str]:
    """Return the content of every dashboard file by file name."""
    return {f"{uid}.json": dump(document) for uid, document in build_documents().items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grafana.build", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DASHBOARD_DIR,
                        help=f"folder to write the JSON files to (default {DASHBOARD_DIR})")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit with status 1 when a file in the folder differs from a fresh build")
    args = parser.parse_args(argv)

    files = render_files()
    return write_or_check(files, args.output, args.check, "python -m grafana.build")


if __name__ == "__main__":
    sys.exit(main())
