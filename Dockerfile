# Image of the exporter, for the Helm chart in helm/anomaly-exporter/.
#   docker build -t REGISTRY/anomaly-exporter:0.1.0 .
FROM python:3.11-slim

# A fixed numeric user, so that Kubernetes' runAsNonRoot can verify it; the chart runs the pod
# with the same user and group.
RUN groupadd --system --gid 10001 anomaly-exporter \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin anomaly-exporter

WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
COPY detectors ./detectors
RUN pip install --no-cache-dir . \
 && rm -rf /src

WORKDIR /
USER 10001:10001
EXPOSE 9847
ENTRYPOINT ["anomaly-exporter", "run"]
CMD ["--config", "/etc/anomaly-exporter/exporter.yml"]
