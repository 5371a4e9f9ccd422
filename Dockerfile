# The agentchassis app image: worker, beat, flower, bridge, relay, metrics, web, the
# example agent and the migration all run from it (see docker-compose.yml). Your own actions: build FROM
# this image, install or copy your module and set CHASSIS_ACTION_MODULES.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CHASSIS_HOME=/var/lib/chassis

WORKDIR /app
COPY pyproject.toml README.md ./
COPY chassis ./chassis
# the example agent's actions (`chassis agent --actions examples.agent`, from /app)
COPY examples ./examples
RUN pip install . \
    && useradd --system --uid 10001 --create-home --home-dir /var/lib/chassis chassis

USER chassis
# Flower, metrics, web console and API, an agent's health server
EXPOSE 5555 9808 8000 8080
HEALTHCHECK --interval=30s --timeout=15s --start-period=20s --retries=3 \
    CMD ["chassis", "health", "--timeout", "5"]
CMD ["chassis", "--help"]
