# chat-gateway image: built in one stage, run in a slim one as an unprivileged user.
#   docker build -t chat-gateway .
#   docker run -p 8000:8000 chat-gateway          # embedded SQLite in the /data volume
#   docker run -p 8000:8000 -e DATABASE_URL=... -e REDIS_URL=... chat-gateway
#   docker run -p 8000:8000 -v chat-data:/data chat-gateway   # a named volume keeps messages

FROM python:3.12-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The versions and hashes CI tests with (constraints.txt, refreshed by scripts/lock).
# pip first, from its own entry there: the image's may predate --no-require-hashes
# (pip 26.2).
COPY constraints.txt ./
RUN awk '/^pip==/ {p = 1; print; next} p && /^[^ ]/ {p = 0} p' constraints.txt >pip.txt \
    && pip install -r pip.txt
COPY pyproject.toml README.md ./
COPY src ./src
COPY clients/js/src ./clients/js/src
# The runtime dependencies only (no extras), each at its pinned version and checked
# against its hashes; the project itself is a directory, with no file to hash.
RUN pip install --no-require-hashes -c constraints.txt .

FROM python:3.12-slim AS run
# /app (the code's working directory) stays root's; the one place the chat user
# writes is /data, where the default SQLite file lives.
RUN groupadd --system --gid 10001 chat \
    && useradd --system --uid 10001 --gid chat --home-dir /app --shell /usr/sbin/nologin chat \
    && mkdir -p /data && chown chat:chat /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATABASE_URL=sqlite:////data/chat-gateway.db
# A volume, so the messages outlive the container; a new volume starts as /data
# is here (owned by chat). A bind mount must be writable by uid 10001.
VOLUME ["/data"]
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
