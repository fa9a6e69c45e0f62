"""Checks that ``check-config`` runs after validation: PromQL syntax and optional dependencies.

``run`` does not repeat them. A query that Prometheus rejects fails its own detector's jobs,
and an autoencoder without TensorFlow fails its own detector's fits, while the other
detectors go on serving. ``check-config`` is where a user wants to hear about both first.
"""

import importlib.util

from exporter.config import Config

# Equipment methods that train the Keras autoencoder.
AUTOENCODER_METHODS = ("autoencoder", "both")

# Longer queries are not parsed. promql-parser 0.12 crashed the process on a chain of 5,000
# names joined by `or` (roughly 35,000 characters) and took 5 s on a chain of 3,000.
MAX_PARSED_LENGTH = 10_000


def promql_problems(config: Config) -> list[str]:
    """Return one line per query that the PromQL grammar of promql-parser rejects.

    With a CSV source the queries are regular expressions over series names, so none is parsed.
    """
    import promql_parser

    problems = []
    if config.source.csv is not None:
        return problems
    for index, detector in enumerate(config.detectors):
        queries = {"query": detector.query} if detector.query is not None else {}
        queries.update({f"queries.{name}": query for name, query in detector.queries.items()})
        for key, query in queries.items():
            if len(query) > MAX_PARSED_LENGTH:
                continue
            try:
                promql_parser.parse(query)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as error:  # the parser's Rust panics derive from BaseException
                problems.append(
                    f"detectors[{index}].{key} (detector {detector.name!r}): {query!r} is not valid PromQL: {error}. "
                    "Fix the expression, or pass --skip-promql if the source speaks an extended dialect such as MetricsQL"
                )
    return problems


def tensorflow_installed() -> bool:
    """Return True when a ``tensorflow`` package is installed, without importing it (that takes seconds)."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


def dependency_problems(config: Config) -> list[str]:
    """Return one line per detector that needs a package that is not installed."""
    problems = []
    for index, detector in enumerate(config.detectors):
        method = detector.params.get("method") if detector.type == "equipment" else None
        if method in AUTOENCODER_METHODS and not tensorflow_installed():
            problems.append(
                f"detectors[{index}].params.method (detector {detector.name!r}): method {method!r} trains an "
                "autoencoder, which needs TensorFlow, and it is not installed. "
                "Run pip install 'anomaly-exporter[tensorflow]', or set method: limits"
            )
    return problems
