"""Fixtures shared by the integration tests that run a real Prometheus."""

import pytest

from exporter.demo.stack import PrometheusProcess, backfill_series


@pytest.fixture(scope="module")
def start_prometheus(tmp_path_factory):
    """Return a function that backfills series into a new TSDB and starts Prometheus on it.

    Every Prometheus started through it stops when the test module ends. A missing
    prometheus or promtool binary raises BinaryNotFoundError with the apt-get command.
    """
    started = []

    def start(series, **options) -> PrometheusProcess:
        data_dir = tmp_path_factory.mktemp("tsdb")
        backfill_series(series, data_dir)
        process = PrometheusProcess(data_dir, **options)
        started.append(process)
        process.start()
        return process

    yield start
    for process in started:
        process.close()
