"""Fixtures shared by the integration tests that run a real Prometheus, and a CLI runner without TensorFlow."""

import textwrap

import pytest

from exporter.demo.stack import PrometheusProcess, backfill_series

# Runs the exporter's CLI after putting a finder first on sys.meta_path that rejects TensorFlow
# and Keras. It writes a line to stderr at every rejected import.
BLOCKED_RUN = textwrap.dedent("""\
    import importlib.abc
    import sys

    class RejectTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.partition(".")[0] in ("tensorflow", "keras"):
                print(f"rejected import of {name}", file=sys.stderr, flush=True)
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, RejectTensorFlow())
    from exporter.cli import main
    sys.exit(main(sys.argv[1:]))
""")


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
