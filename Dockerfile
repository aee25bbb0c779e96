# chat-gateway image: built in one stage, run in a slim one as an unprivileged user.
#   docker build -t chat-gateway .
#   docker run -p 8000:8000 -e DATABASE_URL=... -e REDIS_URL=... chat-gateway

FROM python:3.12-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY pubsub ./pubsub
COPY storage ./storage
COPY webhooks ./webhooks
COPY static ./static
RUN pip install .

FROM python:3.12-slim AS run
RUN groupadd --system --gid 10001 chat \
    && useradd --system --uid 10001 --gid chat --home-dir /app --shell /usr/sbin/nologin chat
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000
WORKDIR /app
USER chat:chat
EXPOSE 8000
# Liveness only; readiness (/readyz) is for the load balancer.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8000')}/healthz\", timeout=2)"]
# SIGTERM drains: sockets closed with 1001, SSE ended, in-flight posts finished.
STOPSIGNAL SIGTERM
ENTRYPOINT ["chat-gateway"]
CMD ["serve"]
