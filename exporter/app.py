"""The running service: HTTP endpoints, the scheduler of fit and score runs, and reloads."""

import logging
import socket
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import CollectorRegistry, make_wsgi_app

from exporter import __version__
from exporter.config import Config, ConfigError, load_config, require_query_api, split_listen_address
from exporter.job import DetectorJob, make_job
from exporter.metrics import AnomalyCollector, SelfMetrics
from exporter.sharding import Shard
from exporter.source import PrometheusSource
from exporter.store import StateStore

log = logging.getLogger(__name__)

# Each detector has at most one fit and one score run at a time, so two workers per
# detector mean a slow detector never holds up another one.
# NOTE: past MAX_WORKERS detectors, runs can wait for a free worker.
MAX_WORKERS = 64


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _IPv6WSGIServer(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        log.debug("http %s", format % args)


class Exporter:
    """Loads the configuration, serves /metrics and runs every detector on its schedule."""

    def __init__(self, config_path: str | Path, config: Config, shard: Shard = Shard()):
        self.config_path = Path(config_path)
        self.config = config
        self.shard = shard
        self.registry = CollectorRegistry(auto_describe=False)
        self.metrics = SelfMetrics(self.registry)
        self.metrics.shard_index.set(shard.index)
        self.metrics.shard_count.set(shard.count)
        self.metrics.config_reload_success.set(1)
        self.metrics.config_reload_time.set_to_current_time()
        self.registry.register(AnomalyCollector(lambda: list(self.jobs.values())))
        self.jobs: dict[str, DetectorJob] = {}
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._reload_lock = threading.Lock()
        self._metrics_app = make_wsgi_app(self.registry)
        self._server = None
        self._server_thread = None
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=self._worker_count(config))},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=timezone.utc,
        )
        self.source = PrometheusSource(config.source)
        self.store = StateStore(config.state_dir)

    @staticmethod
    def _worker_count(config: Config) -> int:
        return min(MAX_WORKERS, max(4, 2 * len(config.detectors)))

    # Life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Bind the HTTP server, restore saved models and start the schedules."""
        host, port = split_listen_address(self.config.listen_address)
        server_class = _IPv6WSGIServer if ":" in host else _ThreadingWSGIServer
        self._server = make_server(host, port, self._wsgi, server_class=server_class, handler_class=_QuietHandler)
        self._server_thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._server_thread.start()
        if self.config.state_dir is None:
            log.warning("state_dir is not set: fitted models are kept in memory only, so a restart refits")
        for detector in self.config.detectors:
            self._add_job(detector)
        self.scheduler.start()
        self.ready.set()
        log.info("anomaly-exporter %s listening on %s with %d detectors, shard %d of %d",
                 __version__, self.address, len(self.jobs), self.shard.index, self.shard.count)

    @property
    def address(self) -> str:
        if self._server is None:
            return self.config.listen_address
        host, port = self._server.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def stop(self) -> None:
        log.info("stopping: waiting for running jobs")
        self.scheduler.shutdown(wait=True)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.source.close()
        self.stopped.set()
        log.info("stopped")

    # Jobs -------------------------------------------------------------------------

    def _add_job(self, detector) -> None:
        job = make_job(detector, self.source, self.store, self.metrics, shard=self.shard)
        job.load_state()
        self.jobs[detector.name] = job
        now = datetime.now(timezone.utc)
        self.scheduler.add_job(
            job.fit,
            IntervalTrigger(seconds=detector.fit_every),
            id=f"{detector.name}:fit",
            name=f"{detector.name} fit",
            next_run_time=now,
        )
        self.scheduler.add_job(
            job.score,
            IntervalTrigger(seconds=detector.score_every),
            id=f"{detector.name}:score",
            name=f"{detector.name} score",
            next_run_time=now + timedelta(milliseconds=100),
        )

    def _remove_job(self, name: str) -> None:
        for suffix in (":fit", ":score"):
            if self.scheduler.get_job(name + suffix):
                self.scheduler.remove_job(name + suffix)
        job = self.jobs.pop(name, None)
        if job is not None:
            # A run in progress goes on in its worker thread; retired, it neither saves nor counts.
            job.retire()
        self.metrics.forget_detector(name)

    # Reload -----------------------------------------------------------------------

    def reload(self) -> tuple[bool, str]:
        """Re-read the configuration file; an invalid file keeps the running configuration."""
        with self._reload_lock:
            try:
                new = require_query_api(load_config(self.config_path), str(self.config_path))
            except ConfigError as error:
                self.metrics.config_reload_success.set(0)
                log.error("reload rejected, keeping the running configuration: %s", error)
                return False, str(error)
            try:
                self._apply(new)
            except OSError as error:
                self.metrics.config_reload_success.set(0)
                log.error("reload failed, keeping the running configuration: %s", error)
                return False, f"reload failed: {error}"
            self.metrics.config_reload_success.set(1)
            self.metrics.config_reload_time.set_to_current_time()
            log.info("configuration reloaded from %s: %d detectors", self.config_path, len(self.jobs))
            return True, "configuration reloaded"

    def _apply(self, new: Config) -> None:
        if new.listen_address != self.config.listen_address:
            log.warning("listen_address in the file is %s; the exporter keeps listening on %s until restarted",
                        new.listen_address, self.address)
            new = new.model_copy(update={"listen_address": self.config.listen_address})
        rebuild_all = new.source != self.config.source or new.state_dir != self.config.state_dir
        if rebuild_all:
            # Build both before closing anything, so a failure keeps the running ones.
            source, store = PrometheusSource(new.source), StateStore(new.state_dir)
            self.source.close()
            self.source, self.store = source, store
        old = {d.name: d for d in self.config.detectors}
        wanted = {d.name: d for d in new.detectors}
        for name in old:
            if name not in wanted or rebuild_all or old[name] != wanted[name]:
                self._remove_job(name)
                if name not in wanted:
                    log.info("detector=%s removed", name)
        for name, detector in wanted.items():
            if name not in self.jobs:
                self._add_job(detector)
        self.config = new

    # HTTP -------------------------------------------------------------------------

    def _wsgi(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path == "/-/healthy":
            healthy = not self.stopped.is_set()
            return _text(start_response, 200 if healthy else 503, "OK\n" if healthy else "stopping\n")
        if path == "/-/ready":
            ready = self.ready.is_set() and not self.stopped.is_set()
            return _text(start_response, 200 if ready else 503, "OK\n" if ready else "not ready\n")
        if path == "/-/reload":
            if method not in ("POST", "PUT"):
                return _text(start_response, 405, "use POST to reload the configuration\n")
            ok, message = self.reload()
            return _text(start_response, 200 if ok else 400, message + "\n")
        if path == "/":
            body = (
                f"anomaly-exporter {__version__}\n\n/metrics\n/-/healthy\n/-/ready\nPOST /-/reload\n"
            )
            return _text(start_response, 200, body)
        return _text(start_response, 404, f"not found: {path}\n")


def _text(start_response, status: int, body: str):
    reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
    data = body.encode("utf-8")
    start_response(
        f"{status} {reasons[status]}",
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))],
    )
    return [data]
