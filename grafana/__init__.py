"""Grafana dashboards of anomaly-exporter, built as code with grafana-foundation-sdk.

``python -m grafana.build`` writes ``grafana/dashboards/<uid>.json`` and
``python -m grafana.configmaps`` writes the Kubernetes ConfigMaps for Grafana's dashboard
sidecar into ``examples/grafana/configmaps/``.
"""
