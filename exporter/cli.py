"""Command line: ``anomaly-exporter run``, ``backtest``, ``check-config`` and ``--version``."""

import argparse
import logging
import os
import signal
import sys
import threading
import time

from exporter import __version__
from exporter.config import ConfigError, load_config, require_query_api, split_listen_address
from exporter.durations import parse_duration
from exporter.sharding import COUNT_VARIABLE, INDEX_VARIABLE, ShardError, resolve_shard

EXIT_CONFIG_ERROR = 2

log = logging.getLogger("exporter")


def _duration_argument(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _count_argument(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a whole number, 0 or more")
    return value


def _listen_address_argument(text: str) -> str:
    # The override skips the configuration's validation, so it is checked here.
    try:
        split_listen_address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomaly-exporter",
        description="Read series from a Prometheus-compatible API and expose anomaly scores as metrics.",
    )
    parser.add_argument("--version", action="version", version=f"anomaly-exporter {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the exporter")
    run.add_argument("--config", "-c", required=True, help="path of the YAML configuration file")
    run.add_argument(
        "--listen-address",
        type=_listen_address_argument,
        help="host:port to serve on; overrides listen_address in the file",
    )
    run.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="lowest level logged"
    )
    run.add_argument(
        "--duration",
        type=_duration_argument,
        help="stop after this long (a Prometheus duration such as 10m); default: run until SIGTERM or SIGINT",
    )
    run.add_argument(
        "--shard-index",
        type=int,
        help=f"this process's shard, from 0 to the shard count - 1; default: {INDEX_VARIABLE}, "
        "else the StatefulSet pod ordinal at the end of HOSTNAME",
    )
    run.add_argument(
        "--shard-count",
        type=int,
        help=f"number of shards that split the entities between them; default: {COUNT_VARIABLE}, else 1",
    )

    backtest = commands.add_parser(
        "backtest", help="replay a time range as the live exporter would and write scores and a report"
    )
    backtest.add_argument("--config", "-c", required=True, help="path of the YAML configuration file")
    backtest.add_argument("--from", dest="start", help="start: now-7d, unix seconds or RFC 3339 (default: 1 day ago, or the CSV files' start)")
    backtest.add_argument("--to", dest="end", help="end, in the same forms (default: now, or the CSV files' end)")
    backtest.add_argument("--detector", action="append", help="replay only this detector; repeatable")
    backtest.add_argument("--output", "-o", default="backtest", help="folder for the outputs (default: backtest)")
    backtest.add_argument("--format", choices=["csv", "parquet"], default="csv", help="format of the scores file")
    backtest.add_argument("--labels", help="JSON file of labelled windows: {series: [[start, end], ...]}")
    backtest.add_argument("--openmetrics", action="store_true", help="also write scores.om for promtool backfill")
    backtest.add_argument("--no-report", action="store_true", help="skip the HTML report and its plots")
    backtest.add_argument("--max-plots", type=_count_argument, default=50, help="plot at most this many series (default 50)")
    backtest.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("config", help="path of the YAML configuration file")
    check.add_argument(
        "--skip-promql", action="store_true",
        help="do not parse the queries as PromQL, for sources with an extended dialect such as MetricsQL",
    )
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def check_config(path: str, *, skip_promql: bool = False) -> int:
    from exporter.checks import dependency_problems, promql_problems

    try:
        config = load_config(path)
        problems = ([] if skip_promql else promql_problems(config)) + dependency_problems(config)
        if problems:
            raise ConfigError(path, problems)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_CONFIG_ERROR
    names = ", ".join(d.name for d in config.detectors)
    noun = "detector" if len(config.detectors) == 1 else "detectors"
    print(f"{path}: valid, {len(config.detectors)} {noun} ({names})")
    return 0


def run(args) -> int:
    _configure_logging(args.log_level)
    try:
        config = require_query_api(load_config(args.config), args.config)
        if args.listen_address:
            config = config.model_copy(update={"listen_address": args.listen_address})
    except ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        shard = resolve_shard(args.shard_index, args.shard_count, os.environ)
    except ShardError as error:
        print(error, file=sys.stderr)
        return EXIT_CONFIG_ERROR

    from exporter.app import Exporter

    try:
        # Creates state_dir and reads the credential files, either of which can fail.
        exporter = Exporter(args.config, config, shard)
    except OSError as error:
        print(f"cannot start: {error.strerror}: {error.filename}; check state_dir and the credential files",
              file=sys.stderr)
        return 1

    stop = threading.Event()

    def _request_stop(signum, _frame):
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    def _request_reload(_signum, _frame):
        if not exporter.ready.is_set():
            log.warning("received SIGHUP before start-up finished; ignored it")
            return
        threading.Thread(target=exporter.reload, name="reload", daemon=True).start()

    # The handlers go in before start() logs the address, because a supervisor may signal as
    # soon as the port accepts connections, and the default action of SIGTERM and SIGHUP kills
    # the process.
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGHUP, _request_reload)
    try:
        exporter.start()
    except OSError as error:
        print(f"cannot listen on {config.listen_address}: {error.strerror}; "
              "choose another address with --listen-address or listen_address", file=sys.stderr)
        return 1

    deadline = None if args.duration is None else time.monotonic() + args.duration
    while not stop.is_set():
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            log.info("--duration elapsed")
            break
        stop.wait(1.0 if remaining is None else min(1.0, remaining))
    exporter.stop()
    return 0


def main(argv=None) -> int:
    # A SIGHUP before the reload handler exists must not kill the process (its default action).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.config, skip_promql=args.skip_promql)
    if args.command == "backtest":
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from exporter.backtest import run_command

        return run_command(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
