"""Tools for the Helm chart in helm/anomaly-exporter/; see helm/generate.py."""
