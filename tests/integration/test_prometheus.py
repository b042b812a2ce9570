"""A real Prometheus scrapes a real `tomocast serve`; every dashboard and alert query returns data.

The Prometheus gets the repository's prometheus.yml (scrape interval shortened to 1 s, target
replaced by the service's port) and alerts.yml. After one simulated scan, each PromQL expression
in deploy/grafana/dashboards/*.json and deploy/prometheus/alerts.yml is evaluated through the HTTP
API. An alert expression ends in a threshold, which filters its result to nothing while all is
well, so its comparisons are evaluated as `bool` comparisons: that returns one sample per series
the alert watches and proves the alert can see the data it is about.

Needs the `prometheus` Debian package (binaries prometheus and promtool); skipped without it,
except under TOMOCAST_REQUIRE_SYSTEM_TOOLS=1 (CI), where it fails.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest
import yaml

from service.client import Detector, Subscriber
from service.events import ScanCompleted, ScanEnded
from service.sim.simulate import simulate_scan

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
# Grafana's variables, given the values a person would pick: the whole of a 1 s-scrape test.
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1m",
    "instance": ".*",
}
ROWS, COLS, ANGLES = 6, 48, 60
T = TypeVar("T")

pytestmark = pytest.mark.slow


# ---- tools and processes ---------------------------------------------------------------------


def system_tool(name: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    message = (
        f"`{name}` is not installed: apt-get install prometheus (the Debian package "
        "`prometheus` has prometheus and promtool)"
    )
    if os.environ.get("TOMOCAST_REQUIRE_SYSTEM_TOOLS") == "1":
        pytest.fail(message + "; TOMOCAST_REQUIRE_SYSTEM_TOOLS=1 makes this an error")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(what: str, check: Callable[[], T | None], timeout: float = 30.0, every: float = 0.2) -> T:
    """Call `check` until it returns something other than None; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)  # a polling interval with a deadline, not synchronisation


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Served:
    ingest: str
    publish: str
    metrics_port: int
    log: Path


@pytest.fixture
def tomocast(tmp_path: Path) -> Iterator[Served]:
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--ingest",
                "tcp://127.0.0.1:*",
                "--publish",
                "tcp://127.0.0.1:*",
                "--metrics-port",
                "0",
                "--device",
                "cpu",
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    ready = re.compile(r"ready: ingest (\S+), publish (\S+), metrics http://127\.0\.0\.1:(\d+)/")

    def started() -> re.Match[str] | None:
        if proc.poll() is not None:
            raise AssertionError(f"tomocast serve exited {proc.returncode}:\n{log.read_text()}")
        return ready.search(log.read_text())

    try:
        match = poll("tomocast serve to log `ready:`", started, timeout=120)
        yield Served(match.group(1), match.group(2), int(match.group(3)), log)
    finally:
        stop(proc)


class Prometheus:
    """A Prometheus server of our own: its own port, config and storage under tmp_path."""

    def __init__(self, binary: str, config: Path, data: Path, log: Path) -> None:
        self.port = free_port()
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def get(self, path: str, **params: str) -> Any:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"prometheus exited {self.proc.returncode}:\n{self.log.read_text()}"
            )
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:  # 400/422: a bad query; the body says why
            with exc:
                body = exc.read()
        except (urllib.error.URLError, ConnectionError):
            return None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body.decode()

    def ready(self) -> bool | None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}/-/ready", timeout=10
            ) as response:
                return True if response.status == 200 else None
        except urllib.error.HTTPError as exc:  # 503 while starting
            exc.close()
            return None
        except (urllib.error.URLError, ConnectionError):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"prometheus exited {self.proc.returncode}:\n{self.log.read_text()}"
                ) from None
            return None

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=expr)
        if not isinstance(answer, dict) or answer.get("status") != "success":
            raise AssertionError(f"Prometheus refused {expr!r}: {answer}")
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def stop(self) -> None:
        stop(self.proc)


@dataclass
class Tools:
    prometheus: str
    promtool: str


@pytest.fixture
def tools() -> Tools:
    return Tools(system_tool("prometheus"), system_tool("promtool"))


@pytest.fixture
def prometheus(tools: Tools, tmp_path: Path, tomocast: Served) -> Iterator[Prometheus]:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{tomocast.metrics_port}"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    server = Prometheus(tools.prometheus, path, tmp_path / "tsdb", tmp_path / "prometheus.log")
    try:
        poll("Prometheus to be ready", server.ready)
        yield server
    finally:
        server.stop()


# ---- the expressions -------------------------------------------------------------------------


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable, Grafana variables filled in."""
    found: list[tuple[str, str]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            title = node.get("title", where)
            if isinstance(node.get("expr"), str):
                found.append((f"{title} [{node.get('refId', '?')}]", node["expr"]))
            for value in node.values():
                walk(value, title if isinstance(title, str) else where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        walk(dashboard["panels"], path.name)
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") == "query":
                query = variable["query"]
                found.append(
                    (
                        f"variable ${variable['name']}",
                        query["query"] if isinstance(query, dict) else query,
                    )
                )
    assert found, "no PromQL in the dashboards"
    return [(where, fill_variables(expr)) for where, expr in found]


def fill_variables(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr!r}"
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def alert_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]:
        rules.extend(group["rules"])
    assert rules
    return rules


COMPARISON = re.compile(r"==|!=|>=|<=|>|<")


def as_bool_comparisons(expr: str) -> str:
    """`a > 0.07` -> `a > bool 0.07` for comparisons outside parentheses, label matchers and
    strings: the alert's own series come back with 0 or 1 instead of being filtered out."""
    out: list[str] = []
    depth, i = 0, 0
    while i < len(expr):
        char = expr[i]
        if char in "\"'`":
            end = expr.index(char, i + 1)
            out.append(expr[i : end + 1])
            i = end + 1
            continue
        if char == "{":
            end = expr.index("}", i)
            out.append(expr[i : end + 1])
            i = end + 1
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        match = COMPARISON.match(expr, i) if depth == 0 else None
        if match and not expr[match.end() :].lstrip().startswith("bool"):
            out.append(match.group() + " bool")
            i = match.end()
            continue
        out.append(char)
        i += 1
    return "".join(out)


def label_values(prometheus: Prometheus, expr: str) -> list[str] | None:
    """Grafana's `label_values(selector, label)` through Prometheus's label-values API."""
    match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", expr)
    assert match, expr
    answer = prometheus.get(f"/api/v1/label/{match.group(2)}/values", **{"match[]": match[1]})
    values: list[str] = answer["data"]
    return values or None


def finite_result(prometheus: Prometheus, expr: str) -> list[dict[str, Any]] | None:
    """The query's result when at least one of its samples is a number (not NaN), else None."""
    result = prometheus.query(expr)
    return result if any(math.isfinite(float(s["value"][1])) for s in result) else None


# ---- the test --------------------------------------------------------------------------------


def test_dashboard_and_alert_queries_return_data(
    tools: Tools, prometheus: Prometheus, tomocast: Served, tmp_path: Path
) -> None:
    promtool = tools.promtool
    poll(
        "Prometheus to scrape tomocast", lambda: prometheus.query('up{job="tomocast"} == 1') or None
    )

    scan = simulate_scan(
        "prom-scan",
        rows=ROWS,
        cols=COLS,
        n_angles=ANGLES,
        photons=2000.0,
        n_dark=2,
        n_flat=2,
        seed=7,
    )
    with (
        Subscriber(tomocast.publish, ("event",)) as viewer,
        Subscriber(tomocast.publish, ("preview",)) as previews,
        Detector(tomocast.ingest) as detector,
    ):
        viewer.wait_ready()
        previews.wait_ready()
        # half the projections, then a preview of them (the preview panels need one), the rest
        half = ANGLES // 2
        detector.start_scan(
            "prom-scan", ROWS, COLS, ANGLES, str(scan.projections.dtype), n_dark=2, n_flat=2
        )
        detector.send_frames("dark", "prom-scan", 0, scan.darks)
        detector.send_frames("flat", "prom-scan", 0, scan.flats)
        detector.send_frames("projections", "prom-scan", 0, scan.projections[:half])
        assert previews.recv(timeout=60.0) is not None, "no preview of the first half"
        detector.send_frames("projections", "prom-scan", half, scan.projections[half:])
        detector.end_scan("prom-scan", ANGLES)
        detector.send_raw(
            [msgpack.packb({"v": 2, "type": "scan_start", "scan_id": "bad", "seq": 0})]
        )
        event = poll("the scan to end", lambda: _ended(viewer), timeout=120, every=0)
    assert isinstance(event, ScanCompleted), event
    poll(
        "Prometheus to see the scan and the rejected message",
        lambda: (
            prometheus.query(
                f'tomocast_slices_published_total{{topic="slice"}} >= {ROWS} '
                'and on () tomocast_rejected_messages_total{reason="bad_version"} > 0'
            )
            or None
        ),
    )

    expressions = dashboard_expressions()
    expressions += [(f"alert {r['alert']}", as_bool_comparisons(r["expr"])) for r in alert_rules()]
    missing: dict[str, str] = {}  # where -> the expression and why it failed
    for where, expr in expressions:
        if expr.lstrip().startswith("label_values("):
            found = poll(f"{where}: {expr}", lambda e=expr: label_values(prometheus, e))
            assert found == [f"127.0.0.1:{tomocast.metrics_port}"], (where, found)
            continue
        try:
            poll(where, lambda e=expr: finite_result(prometheus, e), timeout=15)
        except AssertionError as exc:
            missing[where] = f"{expr}\n    {exc}"
    assert not missing, "no data for:\n" + "\n".join(f"{w}: {e}" for w, e in missing.items())

    # Prometheus evaluates the rules itself: all healthy, and the rejected message fires one.
    def rules_evaluated() -> list[dict[str, Any]] | None:
        groups = prometheus.get("/api/v1/rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        never = "0001-01-01T00:00:00Z"  # lastEvaluation of a rule not evaluated yet
        done = rules and all(
            r["lastEvaluation"] != never and r["health"] != "unknown" for r in rules
        )
        return rules if done else None

    rules = poll("the alert rules to be evaluated", rules_evaluated)
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    firing = poll(
        "TomocastRejectsRising to fire",
        lambda: (
            [
                a
                for a in prometheus.get("/api/v1/alerts")["data"]["alerts"]
                if a["labels"]["alertname"] == "TomocastRejectsRising" and a["state"] == "firing"
            ]
            or None
        ),
    )
    assert [a["labels"]["reason"] for a in firing] == ["bad_version"]

    # promtool: the repository's config and rules, the generated config, a live scrape.
    for args in (
        ["check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
        ["check", "config", str(tmp_path / "prometheus.yml")],
        ["check", "rules", str(PROMETHEUS_DIR / "alerts.yml")],
    ):
        checked = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    url = f"http://127.0.0.1:{tomocast.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        scrape = response.read()
    assert b'tomocast_scans_total{outcome="completed"} 1.0' in scrape
    linted = subprocess.run(
        [promtool, "check", "metrics"], input=scrape, capture_output=True, timeout=60
    )
    assert linted.returncode == 0, (linted.stdout + linted.stderr).decode()


def _ended(viewer: Subscriber) -> ScanEnded | None:
    message = viewer.recv(timeout=1.0)
    event = None if message is None else message.event()
    return event if isinstance(event, ScanEnded) else None
