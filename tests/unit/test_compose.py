"""docker-compose.yml cannot run here (no Docker engine): check its shape instead."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from shared.config import api_config, executor_config

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_has_the_four_services() -> None:
    assert set(compose()["services"]) == {"db", "migrate", "api", "executor"}


def test_database_image_is_timescaledb_pinned_to_a_version() -> None:
    image = compose()["services"]["db"]["image"]
    assert re.fullmatch(r"timescale/timescaledb:\d+\.\d+\.\d+-pg1[67]", image), image


def test_startup_order_is_gated_on_health_and_completion() -> None:
    services = compose()["services"]
    assert services["migrate"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert services["api"]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    assert services["executor"]["depends_on"] == {"api": {"condition": "service_healthy"}}


def test_long_running_services_have_health_checks_and_restart_policies() -> None:
    services = compose()["services"]
    for name in ("db", "api", "executor"):
        assert services[name]["healthcheck"]["test"], name
        assert services[name]["restart"] in {"unless-stopped", "always"}, name
    assert services["api"]["healthcheck"]["test"][:4] == ["CMD", "python", "-m", "tools.healthcheck"]
    assert services["migrate"]["restart"] == "on-failure"


def test_api_listens_on_all_interfaces_and_publishes_its_port() -> None:
    api = compose()["services"]["api"]
    assert api["environment"]["API_ADDR"] == "0.0.0.0:50051"
    assert "50051:50051" in api["ports"]
    assert api["command"] == ["python", "-m", "services.api"]


def test_service_environments_are_valid_configurations() -> None:
    services = compose()["services"]
    for name in ("migrate", "api"):
        env = {k: str(v) for k, v in services[name]["environment"].items()}
        assert api_config(env).database_url.startswith("postgresql://automation:")
    executor_env = {k: str(v) for k, v in services["executor"]["environment"].items()}
    assert executor_config(executor_env).target == "api:50051"
