"""The end-to-end demo: real Prometheus and Alertmanager, real NAB data, a simulator, the exporter.

Run it from a source checkout with ``make demo`` or ``python -m exporter.demo``. It starts
everything on 127.0.0.1, backfills history that ends now, runs the exporter as a child
process with ``examples/demo/exporter.yml`` and prints every alert Alertmanager delivers.
"""

import argparse
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

from exporter.demo import nab
from exporter.demo.simulator import (
    AFFECTED_TENANTS,
    NOISY_NODE,
    NOISY_TENANT,
    TENANT_DETECTOR_METRICS,
    LiveServer,
    default_simulator,
    noisy_neighbour_episode,
)
from exporter.demo.stack import AlertingStack, backfill_series
from exporter.durations import parse_duration
from rules.render import RuleParameters, render_rule_groups

log = logging.getLogger("exporter.demo")

ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = ROOT / "examples" / "demo" / "exporter.yml"
ALERTMANAGER_EXAMPLE = ROOT / "examples" / "alertmanager" / "alertmanager.yml"

SIMULATOR_JOB = "demo"
HISTORY_DAYS = 8
HISTORY_STEP = 60.0
# The tenant detector's step in examples/demo/exporter.yml. Its metrics get history at this step,
# because a range query at a shorter step than the samples repeats each sample.
TENANT_HISTORY_STEP = 30.0

# Alert timing shortened so the demo shows both tiers within minutes; production values are
# the defaults of rules/render.py.
DEMO_RULES = RuleParameters(
    evaluation_interval="10s",
    warning_for="30s",
    critical_for="2m",
    escalation_window="5m",
    peer_warning_for="2m",
    peer_critical_for="1m",
    noisy_neighbor_for="1m",
    noisy_neighbor_critical_for="4m",
    equipment_fault_warning_for="1m",
    equipment_fault_critical_for="1m",
)

# When the demo makes host h2's CPU misbehave, relative to the start, and how strongly.
INJECTION_DELAY = 180.0
INJECTION_NOISE_UNITS = 14.0
INJECTION_SECONDS = 600.0

# When the noisy-neighbour episode starts, relative to the start, and how long it lasts. It waits
# for the tenant detector's first fit too, so that the fit window does not contain it.
TENANT_DETECTOR = "tenants"
NOISY_NEIGHBOUR_DELAY = 240.0
NOISY_NEIGHBOUR_SECONDS = 600.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m exporter.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", default="15m", help="how long to run, as a Prometheus duration (default 15m)")
    parser.add_argument(
        "--exporter-port", type=int, default=0, help="port of the exporter's /metrics on 127.0.0.1 (default: a free port)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (data, logs, configs) at the end")
    return parser


def _history(now: float, live: LiveServer, simulator) -> list:
    series = list(simulator.history(
        now - HISTORY_DAYS * 86400, now - HISTORY_STEP, HISTORY_STEP, job=SIMULATOR_JOB, instance=live.target,
        metric_steps=dict.fromkeys(TENANT_DETECTOR_METRICS, TENANT_HISTORY_STEP),
    ))
    for item in nab.load_all(now - 60.0):
        series.append((item.metric, item.labels, item.timestamps, item.values))
    return series


def _exporter_config(work: Path) -> dict:
    """Return the demo's exporter configuration with its state in the work folder."""
    config = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    config["state_dir"] = str(work / "state")
    return config


def _inhibit_rules() -> list:
    return yaml.safe_load(ALERTMANAGER_EXAMPLE.read_text(encoding="utf-8")).get("inhibit_rules", [])


def _format_alert(alert: dict) -> str:
    labels = alert.get("labels", {})
    status = alert.get("status", "?").upper()
    who = " ".join(f"{k}={labels[k]}" for k in ("detector", "entity") if k in labels)
    annotations = alert.get("annotations", {})
    text = annotations.get("description") or annotations.get("summary", "")
    return f"{time.strftime('%H:%M:%S')} {status:8} {labels.get('severity', '-'):8} {labels.get('alertname', '?')} {who}\n         {text}"


def _has_fitted(metrics_url: str, detector: str) -> bool:
    """Return True once the exporter's /metrics counts a successful fit of ``detector``."""
    try:
        text = requests.get(metrics_url, timeout=5).text
    except requests.RequestException as error:
        log.warning("could not read %s: %s", metrics_url, error)
        return False
    prefix = f'anomaly_exporter_runs_total{{detector="{detector}",phase="fit",result="success"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):]) >= 1
    return False


def _run_summary(metrics_url: str) -> list[str]:
    """Read the exporter's run duration histograms and series counts from its /metrics."""
    try:
        text = requests.get(metrics_url, timeout=5).text
    except requests.RequestException as error:
        return [f"could not read {metrics_url}: {error}"]
    totals: dict[tuple, list[float]] = {}
    series: dict[tuple, float] = {}
    for line in text.splitlines():
        match = re.match(r'anomaly_exporter_run_duration_seconds_(sum|count)\{detector="([^"]+)",phase="([^"]+)"\} (\S+)', line)
        if match:
            kind, detector, phase, value = match.groups()
            entry = totals.setdefault((detector, phase), [0.0, 0.0])
            entry[0 if kind == "sum" else 1] = float(value)
        match = re.match(r'anomaly_exporter_series\{detector="([^"]+)",state="([^"]+)"\} (\S+)', line)
        if match:
            series[(match.group(1), match.group(2))] = float(match.group(3))
    lines = [f"{'detector':24} {'series ready':>12} {'fits':>5} {'mean fit s':>11} {'scores':>7} {'mean score s':>13}"]
    for detector in sorted({d for d, _ in totals}):
        fit_sum, fits = totals.get((detector, "fit"), [0.0, 0.0])
        score_sum, scores = totals.get((detector, "score"), [0.0, 0.0])
        lines.append(
            f"{detector:24} {series.get((detector, 'ready'), 0):12.0f} {fits:5.0f} {fit_sum / max(fits, 1):11.3f} "
            f"{scores:7.0f} {score_sum / max(scores, 1):13.4f}"
        )
    return lines


def run_demo(duration: float, exporter_port: int, keep: bool) -> int:
    work = Path(tempfile.mkdtemp(prefix="anomaly-exporter-demo-"))
    now = time.time()
    simulator = default_simulator(now)
    processes = []
    print(f"work folder: {work}")
    try:
        live = LiveServer(simulator)
        processes.append(live)
        print("backfilling 8 days of simulated tenants, nodes, hosts and equipment and 3 NAB series ...")
        samples = backfill_series(_history(now, live, simulator), work / "tsdb")
        print(f"  {samples} samples written")

        alerting = AlertingStack(
            work, tsdb=work / "tsdb", simulator_target=live.target, simulator_job=SIMULATOR_JOB, interval="10s",
            rule_groups=render_rule_groups(DEMO_RULES), exporter_config=_exporter_config(work),
            inhibit_rules=_inhibit_rules(), exporter_port=exporter_port,
        )
        processes.append(alerting)
        alerting.start()
        receiver, exporter = alerting.receiver, alerting.exporter
        metrics_url = alerting.metrics_url
        log_path = alerting.log_path
        print(f"Prometheus:   {alerting.prometheus.url}")
        print(f"Alertmanager: {alerting.alertmanager.url}")
        print(f"exporter:     {metrics_url}  (log: {log_path})")
        print(f"running for {duration:g}s; host h2's CPU gets an injected spike after {INJECTION_DELAY:g}s, "
              f"and tenant {NOISY_TENANT} becomes a noisy neighbour on {NOISY_NODE} after "
              f"{NOISY_NEIGHBOUR_DELAY:g}s\n")

        started = time.monotonic()
        injected = False
        noisy_started = False
        shown = 0
        while time.monotonic() - started < duration:
            if exporter.poll() is not None:
                print(f"the exporter exited with status {exporter.returncode}; see {log_path}")
                return 1
            if not injected and time.monotonic() - started >= INJECTION_DELAY:
                live.inject({"host": "h2"}, metric="demo_host_cpu_utilisation_ratio",
                            kind="level_shift", magnitude=INJECTION_NOISE_UNITS, duration=INJECTION_SECONDS)
                print(f"{time.strftime('%H:%M:%S')} injected: host h2 CPU up by {INJECTION_NOISE_UNITS:g} noise units")
                injected = True
            if (not noisy_started and time.monotonic() - started >= NOISY_NEIGHBOUR_DELAY
                    and _has_fitted(metrics_url, TENANT_DETECTOR)):
                for anomaly in noisy_neighbour_episode(time.time(), NOISY_NEIGHBOUR_SECONDS):
                    simulator.add_anomaly(anomaly)
                print(f"{time.strftime('%H:%M:%S')} injected: tenant {NOISY_TENANT} overloads {NOISY_NODE} for "
                      f"{NOISY_NEIGHBOUR_SECONDS:g}s, degrading {' and '.join(AFFECTED_TENANTS)}")
                noisy_started = True
            alerts = receiver.alerts()
            for alert in alerts[shown:]:
                print(_format_alert(alert))
            shown = len(alerts)
            time.sleep(1.0)

        print("\nexporter runs (durations include the queries):")
        for line in _run_summary(metrics_url):
            print("  " + line)
        print(f"\n{shown} alert notifications received")
        return 0
    finally:
        for process in reversed(processes):
            if isinstance(process, AlertingStack):
                process.close()
            else:
                process.stop()
        if keep:
            print(f"kept {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        duration = parse_duration(args.duration)
    except ValueError as error:
        print(f"--duration: {error}", file=sys.stderr)
        return 2
    return run_demo(duration, args.exporter_port, args.keep)
