"""The deployment files: compose services, health checks, and only variables the gateway reads."""

from __future__ import annotations

import re

import yaml

from gateway.config import Settings, env_names
from tests.harness import ROOT


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_the_services_health_checks_and_volume():
    doc = compose()
    services = doc["services"]
    gateways = [name for name, s in services.items() if s.get("image", "").startswith(
        "chat-gateway") or s.get("build")]
    assert len(gateways) >= 2
    assert {"postgres", "redis", "lb"} <= set(services)
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no health check"
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    assert "pgdata" in doc["volumes"]
    for name in gateways:
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"
        assert "/readyz" in " ".join(services[name]["healthcheck"]["test"])
    assert set(gateways) <= set(services["lb"]["depends_on"])
    # the balancer sends to every gateway, with no stickiness
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    for name in gateways:
        assert f"server {name}:8000" in nginx
    directives = [line.split("#")[0].strip() for line in nginx.splitlines()]
    assert not [d for d in directives if d.startswith(("ip_hash", "sticky", "hash "))]


def test_every_variable_compose_sets_is_read_by_the_gateway_and_valid():
    services = compose()["services"]
    known = env_names()
    for name, service in services.items():
        if not service.get("build"):
            continue
        env = {k: str(v) for k, v in service["environment"].items()}
        assert set(env) <= known, f"{name} sets unknown variables: {set(env) - known}"
        settings = Settings.from_env(env)  # every value parses
        assert settings.database_url.startswith("postgresql://")
        assert settings.redis_url.startswith("redis://")


def test_dockerfile_is_multi_stage_and_runs_unprivileged():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\w+))?", text, re.M | re.I)
    assert len(stages) >= 2
    assert re.search(r"^COPY --from=build ", text, re.M)
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["chat-gateway"\]', text, re.M)


def test_readme_documents_every_variable_and_backup_restore():
    readme = (ROOT / "README.md").read_text()
    missing = {n for n in env_names() if f"`{n}`" not in readme and n != "STATIC_DIR" and not n.startswith("FAULT_")}
    assert not missing, f"README does not document {missing}"
    assert "pg_dump" in readme and "pg_restore" in readme
