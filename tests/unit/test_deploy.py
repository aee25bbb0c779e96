"""The deployment files: compose services, health checks, and only variables the gateway reads."""

from __future__ import annotations

import re

import yaml

from chat_gateway.config import Settings, env_names
from tests.harness import ROOT


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_the_services_health_checks_and_volume():
    doc = compose()
    services = doc["services"]
    gateways = [
        name
        for name, s in services.items()
        if s.get("image", "").startswith("chat-gateway") or s.get("build")
    ]
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


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the run stage, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    stage = re.split(r"^FROM\s", text, flags=re.M)[-1]
    out = []
    for line in stage.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word:
            out.append((word.upper(), rest.strip()))
    return out


def test_image_with_no_variables_writes_its_sqlite_file_to_a_volume_the_user_owns():
    # The image is not built here: the run stage is read as Docker would run it.
    steps = dockerfile_instructions()
    env: dict[str, str] = {}
    for word, rest in steps:
        if word == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", rest))
    url = env["DATABASE_URL"]
    settings = Settings.from_env(env)
    assert settings.database_url == url and url.startswith("sqlite:////"), url
    data_dir = url[len("sqlite:///") :].rsplit("/", 1)[0]
    volumes = [
        v for word, rest in steps if word == "VOLUME" for v in re.findall(r'"([^"]+)"', rest)
    ]
    assert data_dir in volumes, (
        f"{data_dir} is not a VOLUME: the messages would die with the container"
    )
    user = [rest for word, rest in steps if word == "USER"][-1].split(":")[0]
    # Made and handed to the user before USER: a new volume copies that ownership.
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert re.search(rf"mkdir -p \S*{re.escape(data_dir)}\b", runs)
    assert re.search(rf"chown (-R )?{user}(:\w+)? {re.escape(data_dir)}\b", runs), (
        f"{data_dir} is not owned by {user}"
    )
    workdir = [rest for word, rest in steps if word == "WORKDIR"][-1]
    assert not data_dir.startswith(workdir), "the database must not live in the code's directory"


def test_readme_documents_every_variable_and_backup_restore():
    readme = (ROOT / "README.md").read_text()
    missing = {
        n
        for n in env_names()
        if f"`{n}`" not in readme and n != "STATIC_DIR" and not n.startswith("FAULT_")
    }
    assert not missing, f"README does not document {missing}"
    assert "pg_dump" in readme and "pg_restore" in readme


def test_metrics_stay_behind_the_balancer_and_prometheus_sends_the_compose_key():
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    assert re.search(r"location\s*=\s*/metrics\s*\{\s*return 404;", nginx)
    services = compose()["services"]
    key = services["gateway1"]["environment"]["METRICS_KEY"]
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["authorization"]["credentials"] == key
    targets = job["static_configs"][0]["targets"]
    assert targets == ["gateway1:8000", "gateway2:8000"]
    mounts = services["prometheus"]["volumes"]
    assert any(m.startswith("./deploy/prometheus.yml:") for m in mounts)


def test_scaling_keeps_no_copy_of_the_readmes_figures():
    scaling = (ROOT / "docs" / "scaling.md").read_text()
    assert "README.md#performance" in scaling
    # the measured figures (KiB per connection, deliveries per CPU-second) live in the README
    assert not re.search(r"\d+(\.\d+)? KiB resident", scaling)
    assert not re.search(r"\d{1,3},\d{3} deliveries per (server )?CPU-second", scaling)
