"""The monitoring config: deploy/prometheus (scrape config, alerting rules and their unit tests),
deploy/grafana (datasource, dashboard provider, the pipeline dashboard) and compose's prometheus
and grafana services.

promtool (Debian's `prometheus` package; `.ci/run` installs it) checks the rules and the config
and runs the rules' unit tests. Every PromQL expression may only name the metrics the api and the
executor export (``EXPORTED_METRICS``): a renamed metric fails here instead of leaving an empty
panel or an alert that can never fire.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "pipeline.json"
DATASOURCE = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = GRAFANA_DIR / "provisioning" / "dashboards" / "automation.yml"

# The go-grpc-prometheus names: the api's server side, the executor's client side.
_GRPC_SUFFIXES = (
    "started_total",
    "handled_total",
    "msg_received_total",
    "msg_sent_total",
    "handling_seconds_bucket",
    "handling_seconds_sum",
    "handling_seconds_count",
)
GRPC_METRICS = frozenset(f"grpc_{side}_{suffix}" for side in ("server", "client") for suffix in _GRPC_SUFFIXES)
# Their labels, which match the same pattern as a metric name.
GRPC_LABELS = frozenset({"grpc_type", "grpc_service", "grpc_method", "grpc_code"})


def _histogram(name: str) -> set[str]:
    return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}


AUTOMATION_METRICS = frozenset(
    {
        # api: the pipeline
        "automation_events_created_total",
        "automation_enforcements_created_total",
        "automation_enforcements_resolved_total",
        *_histogram("automation_enforcement_resolution_seconds"),
        # api: read from the database by every replica (max() across replicas)
        "automation_enforcements_pending",
        "automation_enforcement_oldest_pending_seconds",
        "automation_enforcements_leased",
        "automation_enforcements_exhausted",
        # api: dispatch
        "automation_watch_streams",
        "automation_watch_free_credit",
        "automation_dispatch_handoffs_total",
        "automation_dispatch_claimed_total",
        "automation_notify_announcements_total",
        # api: database
        "automation_db_pool_connections",
        "automation_db_pool_waiting",
        "automation_db_pool_max",
        "automation_db_errors_total",
        *_histogram("automation_matching_seconds"),
        # executor
        "automation_executor_decisions_total",
        *_histogram("automation_executor_resolve_batch_size"),
        "automation_executor_reconnects_total",
        "automation_executor_in_flight",
    }
)
EXPORTED_METRICS = GRPC_METRICS | AUTOMATION_METRICS

EXPECTED_ALERTS = frozenset(
    {
        "EnforcementsPendingTooLong",
        "EnforcementsExhausted",
        "GrpcServerErrorRatioHigh",
        "NoExecutorConnected",
        "ApiDown",
        "ExecutorDown",
    }
)

_IDENTIFIER = re.compile(r"\b(?:grpc|automation)_[a-z_]+")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def identifiers(expr: str) -> set[str]:
    """Every ``grpc_*`` or ``automation_*`` identifier in a PromQL expression (metric or label)."""
    return set(_IDENTIFIER.findall(_STRING.sub('""', expr)))


def metric_names(expr: str) -> set[str]:
    """The ``grpc_*`` and ``automation_*`` metric names a PromQL expression reads: identifiers
    outside label matchers (``{...}``) and label lists (``by (...)``, ``on (...)``, ...)."""
    bare = _LABEL_LISTS.sub("", _MATCHERS.sub("", _STRING.sub('""', expr)))
    return set(_IDENTIFIER.findall(bare))


def unknown_names(expr: str) -> set[str]:
    """What ``expr`` names that the services do not export: metrics outside ``EXPORTED_METRICS``
    and ``grpc_``/``automation_`` identifiers that are neither one of them nor a gRPC label."""
    return (metric_names(expr) - EXPORTED_METRICS) | (identifiers(expr) - EXPORTED_METRICS - GRPC_LABELS)


def promtool() -> str:
    """The promtool binary; its absence fails the test (never skips it)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: install Debian's prometheus package "
            "(apt-get install --no-install-recommends prometheus; .ci/run does it when promtool is missing)",
            pytrace=False,
        )
    return path


def run_promtool(*args: str) -> str:
    result = subprocess.run([promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} exited with {result.returncode}:\n{output}"
    assert "SUCCESS" in output, output
    return output


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def compose_services() -> dict[str, Any]:
    services = load_yaml(ROOT / "docker-compose.yml")["services"]
    assert isinstance(services, dict)
    return services


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(ALERTS)["groups"]
    assert [group["name"] for group in groups] == ["automation-pipeline"]
    rules = groups[0]["rules"]
    assert isinstance(rules, list)
    return rules


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query of every panel."""
    queries = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    return queries


# ---- promtool ----------------------------------------------------------------------------------


def test_promtool_accepts_the_alerting_rules() -> None:
    output = run_promtool("check", "rules", str(ALERTS.relative_to(ROOT)))
    assert f"{len(EXPECTED_ALERTS)} rules found" in output, output


def test_the_alerting_rules_pass_their_unit_tests() -> None:
    run_promtool("test", "rules", str(ALERTS_TEST.relative_to(ROOT)))


def test_promtool_accepts_the_scrape_config_with_its_rule_file(tmp_path: Path) -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    # In the container, deploy/prometheus is /etc/prometheus; promtool checks the file exists.
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(ALERTS)]
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config, sort_keys=False))
    output = run_promtool("check", "config", str(copy))
    assert "1 rule files found" in output, output


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool has no "check this expression" command: the queries become recording rules,
    # with Grafana's $__rate_interval replaced by a duration.
    rules = [
        {"record": f"dashboard:query_{index}", "expr": expr.replace("$__rate_interval", "1m")}
        for index, (_, expr) in enumerate(dashboard_queries())
    ]
    assert len(rules) >= 20
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    output = run_promtool("check", "rules", str(path))
    assert f"{len(rules)} rules found" in output, output


# ---- metric names ------------------------------------------------------------------------------


def test_the_name_check_tells_metrics_from_labels() -> None:
    expr = 'sum by (grpc_method) (rate(grpc_server_handled_total{grpc_code!="OK",grpc_type="unary"}[5m]))'
    assert metric_names(expr) == {"grpc_server_handled_total"}
    assert identifiers(expr) == {"grpc_server_handled_total", "grpc_method", "grpc_code", "grpc_type"}
    assert unknown_names(expr) == set()
    assert unknown_names("max(automation_enforcements_pendng)") == {"automation_enforcements_pendng"}
    # A label name used as a metric is caught; label values (strings) are not names.
    assert unknown_names("sum(grpc_method)") == {"grpc_method"}
    assert unknown_names('up{job="automation_whatever"}') == set()


def test_the_dashboard_names_only_exported_metrics() -> None:
    queries = dashboard_queries()
    unknown = {(title, expr): names for title, expr in queries if (names := unknown_names(expr))}
    assert unknown == {}
    used = set().union(*(metric_names(expr) for _, expr in queries))
    # The panels the dashboard promises read these.
    assert {
        "automation_events_created_total",
        "automation_enforcements_created_total",
        "automation_enforcements_resolved_total",
        "automation_enforcement_resolution_seconds_bucket",
        "automation_enforcements_pending",
        "automation_enforcement_oldest_pending_seconds",
        "automation_enforcements_exhausted",
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "automation_db_pool_connections",
        "automation_db_pool_max",
        "automation_db_pool_waiting",
        "automation_matching_seconds_bucket",
        "automation_executor_decisions_total",
        "automation_executor_in_flight",
        "automation_watch_streams",
    } <= used


def test_the_alerts_name_only_exported_metrics() -> None:
    unknown = {rule["alert"]: names for rule in alert_rules() if (names := unknown_names(rule["expr"]))}
    assert unknown == {}


def test_database_gauges_are_aggregated_with_max_never_sum() -> None:
    # Every api replica reads the same rows: summing them would count each row once per replica.
    db_gauges = (
        "automation_enforcements_pending",
        "automation_enforcement_oldest_pending_seconds",
        "automation_enforcements_leased",
        "automation_enforcements_exhausted",
    )
    exprs = [expr for _, expr in dashboard_queries()] + [rule["expr"] for rule in alert_rules()]
    for expr in exprs:
        for gauge in db_gauges:
            if gauge in metric_names(expr):
                assert re.search(rf"\bmax\s*\(\s*{gauge}\b", expr), expr


# ---- alerts ------------------------------------------------------------------------------------


def test_every_alert_has_a_duration_a_severity_and_says_what_to_do() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == EXPECTED_ALERTS and len(rules) == len(EXPECTED_ALERTS)
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule["for"])), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert set(rule["annotations"]) == {"summary", "description"}, name
        assert rule["annotations"]["summary"].strip() and len(rule["annotations"]["description"]) > 80, name
    by_name = {rule["alert"]: rule for rule in rules}
    assert by_name["EnforcementsPendingTooLong"]["for"] == "2m"
    assert by_name["EnforcementsExhausted"]["for"] == "1m"
    assert by_name["GrpcServerErrorRatioHigh"]["for"] == "5m"
    assert by_name["NoExecutorConnected"]["for"] == "2m"
    assert by_name["ApiDown"]["for"] == by_name["ExecutorDown"]["for"] == "1m"
    for name in ("EnforcementsPendingTooLong", "EnforcementsExhausted", "NoExecutorConnected"):
        assert "Dispatch page" in by_name[name]["annotations"]["description"], name


def test_the_error_ratio_counts_only_server_side_codes() -> None:
    expr = next(rule["expr"] for rule in alert_rules() if rule["alert"] == "GrpcServerErrorRatioHigh")
    matched = re.search(r'grpc_code=~"([^"]+)"', expr)
    assert matched is not None, expr
    assert set(matched.group(1).split("|")) == {
        "Unknown",
        "Internal",
        "Unavailable",
        "DataLoss",
        "DeadlineExceeded",
        "ResourceExhausted",
    }


def test_the_unit_tests_show_every_alert_firing_and_quiet() -> None:
    tests = load_yaml(ALERTS_TEST)
    assert tests["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == EXPECTED_ALERTS
    assert quiet == EXPECTED_ALERTS


# ---- the scrape config, Grafana and compose ----------------------------------------------------


def test_prometheus_scrapes_the_ports_compose_gives_the_services() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"automation-api", "automation-executor"}
    services = compose_services()
    for job, service in (("automation-api", "api"), ("automation-executor", "executor")):
        port = services[service]["environment"]["METRICS_ADDR"].rsplit(":", 1)[1]
        assert [target for static in jobs[job]["static_configs"] for target in static["targets"]] == [
            f"{service}:{port}"
        ]
    assert services["api"]["environment"]["METRICS_ADDR"] == "0.0.0.0:9464"
    assert services["executor"]["environment"]["METRICS_ADDR"] == "0.0.0.0:9465"


def test_the_dashboard_is_provisioned_against_the_prometheus_datasource() -> None:
    board = dashboard()
    assert board["uid"] == "automation-pipeline" and board["title"] == "Automation pipeline"
    assert board["schemaVersion"] == 39
    assert "DS_PROMETHEUS" not in DASHBOARD.read_text()
    panels = [panel for panel in board["panels"] if panel["type"] != "row"]
    assert {panel["type"] for panel in panels} <= {"timeseries", "stat"}
    assert len({panel["id"] for panel in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert panel["title"] and panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus", panel["title"]
    datasources = load_yaml(DATASOURCE)["datasources"]
    assert [(d["uid"], d["type"], d["url"]) for d in datasources] == [
        ("prometheus", "prometheus", "http://prometheus:9090")
    ]
    providers = load_yaml(DASHBOARD_PROVIDER)["providers"]
    assert [(p["type"], p["options"]["path"]) for p in providers] == [("file", "/var/lib/grafana/dashboards")]


def test_compose_runs_prometheus_and_grafana_on_the_files_here() -> None:
    services = compose_services()
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["image"].startswith("prom/prometheus")
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "127.0.0.1:9090:9090" in prometheus["ports"]
    assert prometheus["depends_on"] == {"api": {"condition": "service_healthy"}}
    assert grafana["image"].startswith("grafana/grafana")
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    assert "127.0.0.1:3000:3000" in grafana["ports"]
    assert set(grafana["depends_on"]) == {"prometheus"}
    # The mounted directories are the ones in the repository.
    for service in (prometheus, grafana):
        for volume in service["volumes"]:
            source = volume.split(":", 1)[0]
            assert (ROOT / source).is_dir(), volume
