"""Traces over OTLP/HTTP and error reports to Sentry, from real gateway processes
to real HTTP receivers started here (tests/receivers.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import orjson

from tests.harness import WSClient, eventually, instances, post
from tests.receivers import HookReceiver, OtlpReceiver, SentryReceiver, serving

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def traced_env(env: dict[str, str], endpoint: str) -> dict[str, str]:
    return {
        **env,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": "gw-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


async def test_one_post_is_one_trace_with_its_delivery_on_every_instance(gateway_env):
    room = "traced.room"
    with serving(OtlpReceiver()) as otlp:
        async with instances(3, traced_env(gateway_env, otlp.url)) as (a, b, c):
            async with (
                WSClient.connect(b.ws_url) as wb,
                WSClient.connect(c.ws_url) as wc,
                httpx.AsyncClient() as http,
            ):
                await wb.subscribe(room)
                await wc.subscribe(room)
                r = await post(http, a.url, room, "secret words", headers={"traceparent": PARENT})
                assert r.status_code == 201, r.text
                await wb.messages(room, 1)
                await wc.messages(room, 1)

                def whole() -> bool:
                    spans = otlp.trace(TRACE_ID)
                    return (
                        sum(s.name == "deliver" for s in spans) >= 2
                        and any(s.name.startswith("store.") for s in spans)
                        and any(s.name == "redis.pipeline" for s in spans)
                    )

                await eventually(whole, timeout=20)
                spans = otlp.trace(TRACE_ID)
                server = [s for s in spans if s.parent_id == PARENT.split("-")[2]]
                assert len(server) == 1, spans  # the request's span continues the caller's
                assert server[0].attributes.get("chat.request_id") == r.headers["x-request-id"]
                instances_in_trace = {s.instance for s in spans}
                assert len(instances_in_trace) == 3, instances_in_trace
                delivers = [s for s in spans if s.name == "deliver"]
                assert {d.instance for d in delivers} == instances_in_trace - {server[0].instance}
                assert all(d.attributes["messaging.destination.name"] == room for d in delivers)
                assert {s.service for s in spans} == {"gw-under-test"}
                # no message text in any span
                assert all("secret words" not in str(s.attributes) for s in spans)

                # A WebSocket publish frame opens its own trace, delivered the same way.
                async with WSClient.connect(a.ws_url) as wa:
                    await wa.send({"type": "publish", "room": room, "text": "x", "ref": 1})
                    await wa.expect("ack")
                await wb.messages(room, 2)
                frame = await eventually(lambda: otlp.named("ws publish"), timeout=20)
                tid = frame[0].trace_id

                def frame_delivered() -> bool:
                    return sum(s.name == "deliver" for s in otlp.trace(tid)) >= 2

                await eventually(frame_delivered, timeout=20)


async def test_tracing_off_loads_nothing_of_it(gateway_env):
    """Without the variables the gateway loads neither its tracing implementation nor
    OpenTelemetry's trace SDK, exporter or instrumentations, nor Sentry's SDK. (redis-py
    imports some of OpenTelemetry's API and metrics SDK itself when they are installed.)"""
    code = (
        "import sys\n"
        "from chat_gateway.server import cli\n"
        "from chat_gateway.server.app import create_app\n"
        "from chat_gateway import tracing\n"
        "from chat_gateway.ops import reports, logs\n"
        "create_app(); tracing.configure({}); reports.configure(None, release='x', instance='i',"
        " request_id=logs.conn_id)\n"
        "print(sorted(m for m in sys.modules if m.startswith(("
        "'chat_gateway.tracing.otel', 'opentelemetry.sdk.trace', 'opentelemetry.exporter',"
        " 'opentelemetry.instrumentation', 'sentry_sdk'))))\n"
        "print(tracing.active.on)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SENTRY_"))}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert out.split() == ["[]", "False"]


async def test_webhook_requests_carry_a_traceparent(gateway_env):
    with serving(HookReceiver()) as hook, serving(OtlpReceiver()) as otlp:
        env = {
            **traced_env(gateway_env, otlp.url),
            "WEBHOOK_URLS": f"{hook.url}/hook",
            "WEBHOOK_SECRET": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "WEBHOOK_ALLOW_PRIVATE": "true",
        }
        async with instances(1, env) as (gw,), httpx.AsyncClient() as http:
            r = await post(http, gw.url, "hooked", "hi")
            assert r.status_code == 201, r.text
            await eventually(lambda: hook.headers, timeout=20)
            tp = hook.headers[0]["traceparent"]
            version, trace_id, span_id, _flags = tp.split("-")
            assert version == "00" and len(trace_id) == 32 and len(span_id) == 16
            # the request's span is the one the collector got
            await eventually(
                lambda: [s for s in otlp.trace(trace_id) if s.span_id == span_id], timeout=20
            )


async def test_delivery_latency_exemplar_is_the_posts_trace(gateway_env):
    with serving(OtlpReceiver()) as otlp:
        async with instances(1, traced_env(gateway_env, otlp.url)) as (gw,):
            async with WSClient.connect(gw.ws_url) as ws, httpx.AsyncClient() as http:
                await ws.subscribe("ex.room")
                r = await post(http, gw.url, "ex.room", "hi", headers={"traceparent": PARENT})
                assert r.status_code == 201
                await ws.messages("ex.room", 1)
                text = (
                    await http.get(
                        gw.url + "/metrics",
                        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
                    )
                ).text
                latency = [
                    line
                    for line in text.splitlines()
                    if line.startswith("chat_delivery_latency_seconds_bucket") and "#" in line
                ]
                assert any(f'trace_id="{TRACE_ID}"' in line for line in latency), latency
                duration = [
                    line
                    for line in text.splitlines()
                    if line.startswith("chat_http_request_duration_seconds_bucket")
                    and f'trace_id="{TRACE_ID}"' in line
                ]
                assert duration, text
                plain = await http.get(gw.url + "/metrics")
                assert plain.headers["content-type"].startswith("text/plain")
                assert "trace_id" not in plain.text


async def test_an_unexpected_error_reaches_sentry_without_secrets(gateway_env):
    secret_text = "the-words-nobody-else-may-read"
    token_like = "tok_very_secret_value"
    with serving(SentryReceiver()) as sentry:
        env = {**gateway_env, "SENTRY_DSN": sentry.dsn, "FAULT_FAIL_ROOM": "doomed"}
        async with instances(1, env) as (gw,), httpx.AsyncClient() as http:
            r = await http.post(
                f"{gw.url}/v1/rooms/doomed/messages",
                json={"text": secret_text, "author": "ann"},
                headers={"X-Request-ID": "req-for-sentry", "Cookie": f"session={token_like}"},
            )
            assert r.status_code == 500
            assert secret_text not in r.text
            # a client's mistake is not reported (a new connection: the server closes the
            # one whose request failed)
            async with httpx.AsyncClient() as fresh:
                bad = await fresh.post(f"{gw.url}/v1/rooms/doomed/messages", content=b"{")
            assert bad.status_code == 400
            events = await eventually(lambda: sentry.events, timeout=20)
            await asyncio.sleep(0.5)  # anything the bad request might have sent
            assert all(
                e.get("tags", {}).get("request_id") == "req-for-sentry" for e in sentry.events
            ), [(e.get("tags"), e.get("logentry"), e.get("logger")) for e in sentry.events]
            event = events[0]
            assert event["release"]
            assert event["server_name"]
            types = [v["type"] for v in event["exception"]["values"]]
            assert "RuntimeError" in types
            for raw in sentry.raw:
                assert secret_text.encode() not in raw
                assert token_like.encode() not in raw
            assert "query_string" not in orjson.dumps(event).decode() or not event["request"].get(
                "query_string"
            )
