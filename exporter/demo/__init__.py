"""Local Prometheus and Alertmanager stack for the demo and the integration tests."""
