# syntax=docker/dockerfile:1
# Multi-stage: build a wheel and its dependencies in a full image, run from a slim one as a
# fixed non-root UID. The root filesystem can be read-only: the only writable path the gateway
# needs is /var/lib/gateway (the SQLite state file when no Redis is configured), mounted as a volume.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md LICENSE requirements.lock ./
COPY gateway ./gateway
# Dependencies exactly as locked, hashes checked; then the gateway itself, resolving nothing again.
RUN python -m venv /opt/gateway \
 && /opt/gateway/bin/pip install --no-compile --require-hashes -r requirements.lock \
 && /opt/gateway/bin/pip install --no-compile --no-deps . \
 && find /opt/gateway -name '__pycache__' -type d -prune -exec rm -rf {} + \
 && /opt/gateway/bin/python -m compileall -q /opt/gateway/lib

FROM python:3.11-slim-bookworm AS runtime
ARG UID=10001
# The package version (pyproject.toml), passed by the build: docker build --build-arg VERSION=0.1.0
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="sms-gateway" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"
RUN groupadd --system --gid ${UID} gateway \
 && useradd --system --uid ${UID} --gid ${UID} --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin gateway \
 && install -d -o ${UID} -g ${UID} -m 0750 /var/lib/gateway
COPY --from=build /opt/gateway /opt/gateway
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_STATE_PATH=/var/lib/gateway/state.sqlite3 \
    GATEWAY_HTTP__HOST=0.0.0.0 \
    GATEWAY_HTTP__PORT=8080 \
    GATEWAY_LOG_FORMAT=json
VOLUME ["/var/lib/gateway"]
USER ${UID}:${UID}
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s \
  CMD ["python", "-c", "import os,sys,urllib.request; e=os.environ; port=e.get('GATEWAY_HTTP__PORT') or e.get('GATEWAY_HTTP_PORT') or '8080'; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["gateway"]
CMD ["run"]
