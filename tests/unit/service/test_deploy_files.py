"""The deployment files parse, reference files that exist, agree with each other, query only
metrics the service exports, and are explained in docs/operations.md.

(Whether their PromQL returns data from a live service: tests/integration/test_prometheus.py.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from service.config import Settings
from service.metrics import SLICE_BUDGET_SECONDS, STAGES, Metrics

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tomocast.json"
OPERATIONS = REPO / "docs" / "operations.md"


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus Docker Compose's `!reset` tag (the value becomes None)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(REPO / "docker-compose.yml")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def alerts() -> list[dict[str, Any]]:
    groups = load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path (relative to the repository) of a service's bind mounts."""
    found = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        if host.startswith((".", "/")):
            found[container] = host
    return found


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """Where a path inside the container comes from on the host, through the bind mounts."""
    path = PurePosixPath(container_path)
    for target, source in mounts(service).items():
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return REPO / source / path.relative_to(target)
    raise AssertionError(f"{container_path} is not mounted from the repository")


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    flat = []
    for panel in dashboard["panels"]:
        flat.append(panel)
        flat.extend(panel.get("panels", []))
    return flat


def expressions(dashboard: dict[str, Any], alerts: list[dict[str, Any]]) -> list[str]:
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs + [rule["expr"] for rule in alerts]


# ---- docker-compose.yml and the Dockerfile ---------------------------------------------------


def test_compose_references_files_that_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"tomocast", "prometheus", "grafana", "simulator"} <= set(services)
    for name, service in services.items():
        if "build" in service:
            context = REPO / service["build"]["context"]
            assert context.is_dir(), name
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose.get("volumes", {}), f"{name}: undeclared volume {source}"
        depends = service.get("depends_on", [])
        assert set(depends) <= set(services), name


def test_compose_gpu_demo_profile_and_healthcheck(compose: dict[str, Any]) -> None:
    services = compose["services"]
    devices = services["tomocast"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["simulator"]["profiles"] == ["demo"]
    assert services["simulator"]["depends_on"]["tomocast"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(services["tomocast"]["healthcheck"]["test"])
    for name in ("tomocast", "prometheus", "grafana"):
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), name
    simulate = services["simulator"]["command"]
    assert simulate[simulate.index("--connect") + 1] == "tcp://tomocast:5555"


def test_cpu_override_drops_the_gpu(compose: dict[str, Any]) -> None:
    override = load_yaml(DEPLOY / "docker-compose.cpu.yml")["services"]
    assert set(override) <= set(compose["services"])
    assert override["tomocast"]["deploy"] is None  # !reset
    assert override["tomocast"]["command"][-2:] == ["--device", "cpu"]


def test_dockerfile_copies_what_exists() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    sources = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    assert sources
    for names in sources:
        for name in names:
            assert (REPO / name).exists(), name
    assert "9876" in text and "TOMOCAST_METRICS__HOST=0.0.0.0" in text


# ---- Prometheus ------------------------------------------------------------------------------


def test_prometheus_config_is_mounted_with_its_rules(compose: dict[str, Any]) -> None:
    service = compose["services"]["prometheus"]
    flag = next(a for a in service["command"] if a.startswith("--config.file="))
    container_config = flag.partition("=")[2]
    config_path = host_path(service, container_config)
    assert config_path == DEPLOY / "prometheus" / "prometheus.yml"
    config = load_yaml(config_path)
    for rule_file in config["rule_files"]:
        inside = PurePosixPath(container_config).parent / rule_file
        assert host_path(service, str(inside)).is_file(), rule_file
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "tomocast"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose["services"]
    assert any(p.endswith(f":{port}") for p in compose["services"][host]["ports"])


def test_alert_rules_are_complete(alerts: list[dict[str, Any]]) -> None:
    names = {rule["alert"] for rule in alerts}
    assert {
        "TomocastSliceOverBudget",
        "TomocastRejectsRising",
        "TomocastNoSlicesWhileProjectionsArrive",
    } <= names
    for rule in alerts:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    budget = next(r for r in alerts if r["alert"] == "TomocastSliceOverBudget")
    assert budget["expr"].rstrip().endswith(f"> {SLICE_BUDGET_SECONDS:g}")


def test_queries_name_only_exported_metrics(
    dashboard: dict[str, Any], alerts: list[dict[str, Any]]
) -> None:
    exported = {sample.name for metric in Metrics().registry.collect() for sample in metric.samples}
    used = {
        name
        for expr in expressions(dashboard, alerts)
        for name in re.findall(r"\btomocast_[a-z0-9_]+", expr)
    }
    assert used, "no tomocast metric in the dashboard or alerts"
    assert used <= exported, f"not exported by service/metrics.py: {sorted(used - exported)}"
    assert {m for m in exported if not m.endswith("_created")} - used <= {
        "tomocast_stage_seconds_count",
        "tomocast_stage_seconds_sum",
    } | {f"tomocast_scan_tail_seconds_{s}" for s in ("count", "sum")}, "metrics on no panel"


# ---- Grafana ---------------------------------------------------------------------------------


def test_grafana_provisioning_points_at_the_dashboard(
    compose: dict[str, Any], dashboard: dict[str, Any]
) -> None:
    grafana = compose["services"]["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    (datasources,) = [load_yaml(p) for p in (provisioning / "datasources").glob("*.yml")]
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", source["url"]).groups()  # type: ignore[union-attr]
    assert host in compose["services"] and any(
        p.endswith(f":{port}") for p in compose["services"][host]["ports"]
    )
    (providers,) = [load_yaml(p) for p in (provisioning / "dashboards").glob("*.yml")]
    (provider,) = providers["providers"]
    folder = host_path(grafana, provider["options"]["path"])
    assert folder.resolve() == DASHBOARD.parent.resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(grafana, home).resolve() == DASHBOARD.resolve()
    variable = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert variable["current"]["value"] == source["uid"]


def test_dashboard_shape(dashboard: dict[str, Any]) -> None:
    all_panels = panels(dashboard)
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in all_panels)
    for stage in set(STAGES) - {"wait"}:
        assert re.search(
            rf"{stage}: p50 / p95 / p99|{stage.replace('_', '-')}", titles, re.IGNORECASE
        ), stage
    for needed in (
        "Slices published/s",
        "Projections in/s",
        "Ingest MB/s",
        "Queue depths",
        "Rejected messages by reason",
        "GPU memory",
        "Batch size",
        "Model",
    ):
        assert needed in titles, needed
    for panel in all_panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    budget_panels = [p for p in all_panels if "p99" in p["title"] or "Per-slice" in p["title"]]
    assert len(budget_panels) >= 7
    for panel in budget_panels:
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["unit"] == "s"
        assert defaults["custom"]["thresholdsStyle"]["mode"].startswith("line")
        assert defaults["thresholds"]["steps"][-1]["value"] == SLICE_BUDGET_SECONDS


# ---- docs ------------------------------------------------------------------------------------


def test_operations_doc_explains_settings_panels_and_alerts(
    dashboard: dict[str, Any], alerts: list[dict[str, Any]]
) -> None:
    text = OPERATIONS.read_text()
    for section, field in Settings.model_fields.items():
        model = field.annotation
        names = getattr(model, "model_fields", None)
        for name in names or [None]:
            key = f"{section}.{name}" if name else section
            assert f"`{key}`" in text, f"docs/operations.md does not document {key}"
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["title"] in text, f"docs/operations.md does not explain {panel['title']!r}"
    for rule in alerts:
        assert rule["alert"] in text, rule["alert"]
    for port in ("5555", "5556", "9876", "9090", "3000"):
        assert port in text
