# The image named by the design document, agentapi-proxy:latest. It runs the
# control plane and gateway (`agentapi-proxy serve`, the default command) and is
# also the default agent image of provision mode, which starts the bundled
# reference agent in it (setting provision_mode.command).
#
#   docker build -t agentapi-proxy:latest .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AGENTAPI_STATE_DIR=/var/lib/agentapi-proxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --uid 10001 --home-dir /data --create-home agentapi \
    && mkdir -p /var/lib/agentapi-proxy && chown 10001 /var/lib/agentapi-proxy
USER 10001
WORKDIR /data
# 8080 gateway, 50051 gRPC control plane, 3284 an agent (agentapi's default port).
EXPOSE 8080 50051 3284
ENTRYPOINT ["agentapi-proxy"]
CMD ["serve"]
