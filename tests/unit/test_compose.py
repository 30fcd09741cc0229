"""docker-compose.yml cannot run here (no Docker engine): check its shape instead."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.config import api_config, client_security, executor_config
from tools import certs

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_has_its_ten_services() -> None:
    assert set(compose()["services"]) == {
        "db",
        "migrate",
        "certs",
        "tokens",
        "api",
        "executor",
        "web-token",
        "web",
        "prometheus",
        "grafana",
    }


def test_the_web_service_reaches_the_api_with_its_own_webhook_token() -> None:
    services = compose()["services"]
    web = services["web"]
    assert web["command"] == ["python", "-m", "services.web"]
    assert web["environment"]["API_TOKEN_FILE"] == "/tokens/web" and "127.0.0.1:8080:8080" in web["ports"]
    assert web["depends_on"] == {
        "api": {"condition": "service_healthy"},
        "web-token": {"condition": "service_completed_successfully"},
    }
    assert "--role" in services["web-token"]["command"] and "webhook" in services["web-token"]["command"]
    assert web["healthcheck"]["test"] and web["restart"] == "unless-stopped"


def test_database_image_is_timescaledb_pinned_to_a_version() -> None:
    image = compose()["services"]["db"]["image"]
    assert re.fullmatch(r"timescale/timescaledb:\d+\.\d+\.\d+-pg1[67]", image), image


def test_startup_order_is_gated_on_health_and_completion() -> None:
    services = compose()["services"]
    assert services["migrate"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert services["api"]["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully"},
        "certs": {"condition": "service_completed_successfully"},
    }
    assert services["executor"]["depends_on"] == {
        "api": {"condition": "service_healthy"},
        "tokens": {"condition": "service_completed_successfully"},
    }
    assert services["tokens"]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}


def test_long_running_services_have_health_checks_and_restart_policies() -> None:
    services = compose()["services"]
    for name in ("db", "api", "executor"):
        assert services[name]["healthcheck"]["test"], name
        assert services[name]["restart"] in {"unless-stopped", "always"}, name
    assert services["api"]["healthcheck"]["test"][:4] == ["CMD", "python", "-m", "tools.healthcheck"]
    assert services["migrate"]["restart"] == "on-failure:3"
    assert services["certs"]["restart"] == "on-failure:3"


def test_api_listens_on_all_interfaces_and_publishes_its_port_on_loopback() -> None:
    api = compose()["services"]["api"]
    assert api["environment"]["API_ADDR"] == "0.0.0.0:50051"
    assert "127.0.0.1:50051:50051" in api["ports"]
    assert api["command"] == ["python", "-m", "services.api"]


@pytest.fixture(scope="module")
def certs_volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the compose `certs` service writes into its volume, made here by the same command."""
    command = compose()["services"]["certs"]["command"]
    assert command[:4] == ["python", "-m", "tools.certs", "/certs"]
    directory = tmp_path_factory.mktemp("certs")
    assert certs.main([str(directory), *command[4:]]) == 0
    return directory


def _environment(name: str, volume: Path) -> dict[str, str]:
    """A service's environment with /certs/... pointing into ``volume`` (and /tokens/... too,
    where a token file made here stands for the one the `tokens` service writes)."""
    env = compose()["services"][name]["environment"]
    out = {k: str(v).replace("/certs/", f"{volume}/").replace("/tokens/", f"{volume}/tokens/") for k, v in env.items()}
    (volume / "tokens").mkdir(exist_ok=True)
    (volume / "tokens" / "executor").write_text("atk_example\n")
    return out


def test_the_executor_reads_its_token_from_the_file_the_tokens_service_writes(certs_volume: Path) -> None:
    services = compose()["services"]
    command = services["tokens"]["command"]
    assert command[:5] == ["python", "-m", "services.api", "tokens", "create"]
    out = command[command.index("--out") + 1]
    assert services["executor"]["environment"]["API_TOKEN_FILE"] == out
    assert "executor" in command and "tokens:/tokens" in services["tokens"]["volumes"]
    assert "tokens:/tokens:ro" in services["executor"]["volumes"]
    assert executor_config(_environment("executor", certs_volume)).security.token == "atk_example"


def test_service_environments_are_valid_configurations(certs_volume: Path) -> None:
    for name in ("migrate", "api"):
        assert api_config(_environment(name, certs_volume)).database_url.startswith("postgresql://automation:")
    assert executor_config(_environment("executor", certs_volume)).target == "api:50051"


def test_the_api_serves_tls_with_the_certificates_the_certs_service_makes(certs_volume: Path) -> None:
    services = compose()["services"]
    api = api_config(_environment("api", certs_volume))
    assert api.tls_cert == f"{certs_volume}/api.pem" and api.tls_key == f"{certs_volume}/api-key.pem"
    executor = executor_config(_environment("executor", certs_volume))
    assert executor.security.ca == f"{certs_volume}/ca.pem"
    # The executor connects to "api" by name: the api's certificate must name it.
    hosts = services["certs"]["command"][services["certs"]["command"].index("--hosts") + 1].split(",")
    assert executor.target.rsplit(":", 1)[0] in hosts and "localhost" in hosts
    assert not executor.security.server_name
    for name in ("certs", "api", "executor"):
        mount = "certs:/certs" if name == "certs" else "certs:/certs:ro"
        assert mount in services[name]["volumes"], name
    assert "certs" in compose()["volumes"]


def test_the_api_health_check_speaks_tls_with_files_that_exist(certs_volume: Path) -> None:
    test = compose()["services"]["api"]["healthcheck"]["test"]
    args = test[4:]
    flags = dict(zip(args[:-1:2], args[1:-1:2], strict=True))
    assert set(flags) == {"--ca", "--cert", "--key"} and args[-1] == "127.0.0.1:50051"
    files = {k: v.replace("/certs/", f"{certs_volume}/") for k, v in flags.items()}
    assert all(Path(f).is_file() for f in files.values()), files
    security = client_security(
        {"API_TLS_CA": files["--ca"], "API_TLS_CLIENT_CERT": files["--cert"], "API_TLS_CLIENT_KEY": files["--key"]}
    )
    assert security.tls and security.cert
