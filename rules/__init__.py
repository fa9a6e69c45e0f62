"""Prometheus alerting and recording rules for anomaly-exporter, rendered by rules.render."""
