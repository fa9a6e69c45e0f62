"""anomaly-exporter: reads series from a Prometheus-compatible API and exposes anomaly scores."""

__version__ = "0.1.0"
