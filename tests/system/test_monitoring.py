"""deploy/: the alert rules pass promtool's checks and unit tests, the Grafana
dashboard charts series the gateway exports, and a real Prometheus scraping two
real gateways loads the rules and fires an alert when one of them is killed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import yaml

from tests.harness import ROOT, eventually, free_port, instances, t

DEPLOY = ROOT / "deploy"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, (
        f"{name} is not on PATH: install Debian's prometheus package "
        "(apt-get install -y prometheus), as .ci/run does"
    )
    return path


def run(*argv: str) -> str:
    done = subprocess.run(argv, cwd=DEPLOY, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_rules_and_config_pass_promtool():
    promtool = tool("promtool")
    assert "SUCCESS: 7 rules found" in run(promtool, "check", "rules", "alerts.yml")
    assert "SUCCESS" in run(promtool, "test", "rules", "alerts.test.yml")
    assert "SUCCESS" in run(promtool, "check", "config", "prometheus.yml")


def test_every_alert_the_issue_asks_for_is_there():
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert names == {
        "ChatGatewayDown",
        "ChatGatewayNotReady",
        "ChatRedisFallback",
        "ChatSlowConsumerDisconnectsRising",
        "ChatWebhookBacklog",
        "ChatWebhookDeadLetters",
        "ChatDeliveryLatencyHigh",
    }


def test_compose_provisions_grafana_with_the_dashboard():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    mounts = services["grafana"]["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    assert any(m.startswith("./deploy/alerts.yml:") for m in services["prometheus"]["volumes"])
    source = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert source["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "chat-gateway.yml").read_text()
    )["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


async def test_dashboard_and_rules_query_series_the_gateway_exports(gateway_env):
    """Every chat_* name the dashboard and the rules use is on a real gateway's /metrics
    (with webhooks on, so their series are there too)."""
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "chat-gateway.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    exprs += [
        r["expr"] for r in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"][0]["rules"]
    ]
    used = {
        re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in re.findall(r"chat_\w+", e)
    }
    env = {
        **gateway_env,
        "WEBHOOK_URLS": "http://127.0.0.1:9/hook",
        "WEBHOOK_SECRET": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "WEBHOOK_ALLOW_PRIVATE": "true",
    }
    async with instances(1, env) as (gw,), httpx.AsyncClient() as http:
        await http.post(f"{gw.url}/v1/rooms/dash/messages", json={"text": "x", "author": "a"})
        text = (await http.get(gw.url + "/metrics")).text
    exported = {
        re.sub(r"_(bucket|count|sum|total)$", "", m) for m in re.findall(r"^(chat_\w+)", text, re.M)
    }
    missing = {n for n in used if n not in exported and re.sub(r"_total$", "", n) not in exported}
    assert not missing, missing


async def test_prometheus_loads_the_rules_and_fires_when_a_gateway_dies(gateway_env):
    prometheus = tool("prometheus")
    async with instances(2, gateway_env) as (a, b):
        with tempfile.TemporaryDirectory(prefix="cgtest-prom-") as tmp:
            config = {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(DEPLOY / "alerts.yml")],
                "scrape_configs": [
                    {
                        "job_name": "chat-gateway",
                        "scrape_timeout": "900ms",
                        "static_configs": [
                            {"targets": [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]}
                        ],
                    }
                ],
            }
            (Path(tmp) / "prometheus.yml").write_text(yaml.safe_dump(config))
            port = free_port()
            log = open(Path(tmp) / "prometheus.log", "wb")
            proc = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={tmp}/prometheus.yml",
                    f"--storage.tsdb.path={tmp}/data",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            api = f"http://127.0.0.1:{port}/api/v1"
            try:
                async with httpx.AsyncClient(timeout=5) as http:

                    async def get(path: str) -> dict | None:
                        try:
                            r = await http.get(api + path)
                        except httpx.HTTPError:
                            return None
                        return r.json()["data"] if r.status_code == 200 else None

                    async def rules_loaded() -> bool:
                        data = await get("/rules")
                        names = {
                            r["name"] for g in (data or {}).get("groups", []) for r in g["rules"]
                        }
                        return "ChatGatewayDown" in names and len(names) == 7

                    assert await eventually(rules_loaded, timeout=60), Path(
                        tmp, "prometheus.log"
                    ).read_text()[-3000:]

                    async def both_up() -> bool:
                        data = await get("/query?query=up")
                        values = [r["value"][1] for r in (data or {}).get("result", [])]
                        return values == ["1", "1"]

                    await eventually(both_up, timeout=60)
                    assert not [
                        x
                        for x in (await get("/alerts"))["alerts"]
                        if x["labels"]["alertname"] == "ChatGatewayDown"
                    ]
                    b.kill()

                    async def firing() -> list[dict]:
                        data = await get("/alerts")
                        return [
                            x
                            for x in (data or {}).get("alerts", [])
                            if x["labels"]["alertname"] == "ChatGatewayDown"
                            and x["state"] == "firing"
                        ]

                    fired = await eventually(firing, timeout=90, interval=0.5)
                    assert [x["labels"]["instance"] for x in fired] == [f"127.0.0.1:{b.port}"]
            finally:
                proc.terminate()
                proc.wait(t(30))
                log.close()
