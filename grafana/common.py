"""Building blocks shared by the dashboards: variables, queries, thresholds, mappings and links.

Every panel queries the Prometheus data source chosen in the ``datasource`` variable, so the
JSON files import into any Grafana without editing data source uids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dashboard_builder
from grafana_foundation_sdk.builders import prometheus
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dashboard_model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from rules.render import RuleParameters

# Every dashboard carries this tag, and the link menu of each dashboard lists the dashboards
# that have it.
TAG = "anomaly-exporter"

DATASOURCE = dashboard_model.DataSourceRef(type_val="prometheus", uid="${datasource}")

# The score thresholds of the shipped alert rules: 1 is the band edge (warning), 2 critical.
RULE_DEFAULTS = RuleParameters()
WARNING_SCORE = float(RULE_DEFAULTS.warning_score)
CRITICAL_SCORE = float(RULE_DEFAULTS.critical_score)

# Matchers of the detector and entity variables on dashboards where both allow several values.
SELECTED = 'detector=~"$detector", entity=~"$entity"'

_REF_IDS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def slugify(title: str) -> str:
    """Return the URL slug Grafana derives from a plain ASCII dashboard title.

    Grafana lowercases the title and turns every run of other characters into one dash.
    Titles with accents or non-Latin letters get other slugs, and none of ours has them.
    """
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


# --- dashboards, variables and links -----------------------------------------------------------


def new_dashboard(uid: str, title: str, description: str, *, time_from: str = "now-6h") -> dashboard_builder.Dashboard:
    """Start a dashboard with the shared tag, time range, refresh and link menu."""
    return (
        dashboard_builder.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .time(time_from, "now")
        .refresh("1m")
        .timezone("browser")
        .tooltip(dashboard_model.DashboardCursorSync.CROSSHAIR)
        .link(
            dashboard_builder.DashboardLink("Anomaly dashboards")
            .type(dashboard_model.DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )


def datasource_variable() -> dashboard_builder.DatasourceVariable:
    return dashboard_builder.DatasourceVariable("datasource").label("Data source").type("prometheus")


def query_variable(name: str, label: str, definition: str, *, multi: bool) -> dashboard_builder.QueryVariable:
    """Build a variable filled by a ``label_values(...)`` query, refreshed with the time range.

    A multi-value variable also offers All, whose value is the regex ``.*``, so panels must
    match it with ``=~``. A single-value variable is matched with ``=``.
    """
    variable = (
        dashboard_builder.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(definition)
        .refresh(dashboard_model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_model.VariableSort.ALPHABETICAL_ASC)
        .multi(multi)
        .include_all(multi)
    )
    if multi:
        variable = variable.all_value(".*").current(
            dashboard_model.VariableOption(selected=True, text="All", value="$__all")
        )
    return variable


def dashboard_url_link(title: str, path: str, query: str) -> dashboard_builder.DashboardLink:
    """Build a data link to another dashboard that keeps the data source and the time range."""
    return dashboard_builder.DashboardLink(title).url(f"{path}?${{datasource:queryparam}}&{query}&${{__url_time_range}}")


# --- queries -----------------------------------------------------------------------------------


def query(expr: str, legend: str = "", *, instant: bool = False, table: bool = False) -> prometheus.Dataquery:
    """Build a Prometheus query. With ``instant`` it returns the latest value only, with ``table`` one row per series."""
    target = prometheus.Dataquery().expr(expr).legend_format(legend or "__auto")
    if instant:
        target = target.instant()
    else:
        target = target.range()
    if table:
        target = target.format(PromQueryFormat.TABLE)
    return target


def with_targets(panel: Builder, *targets: prometheus.Dataquery) -> Builder:
    """Attach the queries to the panel with reference ids A, B, ... and the dashboard's data source."""
    if len(targets) > len(_REF_IDS):
        raise ValueError(f"a panel takes at most {len(_REF_IDS)} queries, got {len(targets)}")
    panel = panel.datasource(DATASOURCE)
    for ref_id, target in zip(_REF_IDS, targets):
        panel = panel.with_target(target.ref_id(ref_id).datasource(DATASOURCE))
    return panel


# --- thresholds, mappings and field overrides --------------------------------------------------


def thresholds(*steps: tuple[float | None, str]) -> dashboard_builder.ThresholdsConfig:
    """Build absolute thresholds from ``(value, color)`` steps. The first step is the base, with the value None."""
    return (
        dashboard_builder.ThresholdsConfig()
        .mode(dashboard_model.ThresholdsMode.ABSOLUTE)
        .steps([dashboard_model.Threshold(value=value, color=color) for value, color in steps])
    )


def score_thresholds() -> dashboard_builder.ThresholdsConfig:
    return thresholds((None, "green"), (WARNING_SCORE, "orange"), (CRITICAL_SCORE, "red"))


def value_text(mapping: Mapping[int, tuple[str, str]]) -> list[dashboard_model.ValueMap]:
    """Map whole-number values to text and color, for example ``{0: ("Down", "red")}``."""
    options = {
        str(value): dashboard_model.ValueMappingResult(text=text, color=color, index=index)
        for index, (value, (text, color)) in enumerate(sorted(mapping.items()))
    }
    return [dashboard_model.ValueMap(options=options)]


def override(name: str, properties: Mapping[str, Any]) -> tuple[str, list[dashboard_model.DynamicConfigValue]]:
    """Return the arguments of ``override_by_name`` that set field config ``properties`` on series ``name``."""
    return name, [dashboard_model.DynamicConfigValue(id_val=key, value=value) for key, value in properties.items()]


def tooltip_all_series() -> common_builder.VizTooltipOptions:
    return common_builder.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)


def legend_list() -> common_builder.VizLegendOptions:
    return (
        common_builder.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.LIST)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
    )


def last_value() -> common_builder.ReduceDataOptions:
    return common_builder.ReduceDataOptions().values(False).calcs(["lastNotNull"]).fields("")


# --- output ------------------------------------------------------------------------------------


def to_document(dashboard: dashboard_builder.Dashboard) -> dict[str, Any]:
    """Build the dashboard and return its JSON document with panel ids 1, 2, ... in layout order.

    The SDK leaves panel ids unset, and Grafana would otherwise assign them on load, so fixed
    ids keep panel links (``viewPanel=<id>``) and the committed files stable.
    """
    document = json.loads(JSONEncoder(sort_keys=True).encode(dashboard.build()))
    for panel_id, panel in enumerate(_walk_panels(document.get("panels", [])), start=1):
        panel["id"] = panel_id
    return document


def _walk_panels(panels: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for panel in panels:
        yield panel
        # A collapsed row contains its panels.
        yield from _walk_panels(panel.get("panels", []))


def dump(document: Mapping[str, Any]) -> str:
    """Serialise a dashboard document as indented JSON with sorted keys and a final newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
