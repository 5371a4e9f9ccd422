"""Settings, read from the environment. The only module that reads ``os.environ``.

With nothing set, everything is embedded: SQLite and a file-system broker under
``./.chassis/`` (or ``CHASSIS_HOME``), so that ``chassis demo`` needs no server.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from celery.app.backends import BACKEND_ALIASES
from kombu.transport import TRANSPORT_ALIASES

from chassis.errors import ConfigError, InputError
from chassis.limits import INT32_MAX, Limits, check_name

#: Where AI steps send their requests: Claude through the anthropic SDK, or the
#: deterministic offline stand-in (see chassis.ai).
AI_PROVIDERS = ("anthropic", "offline")
#: Current Claude model ids per tier (override with CHASSIS_CLAUDE_<TIER>_MODEL).
DEFAULT_CLAUDE_HAIKU_MODEL = "claude-haiku-5-5"
DEFAULT_CLAUDE_SONNET_MODEL = "claude-sonnet-5-5"
DEFAULT_CLAUDE_OPUS_MODEL = "claude-opus-5-5"
_RATE_LIMIT = re.compile(r"^\d+(\.\d+)?(/[smh])?$")


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (value or "").split(",") if p.strip())


@dataclass(frozen=True)
class Settings:
    """Every configuration variable of agentchassis, with its default."""

    home: Path
    """CHASSIS_HOME: folder of the embedded database and broker (default ./.chassis)."""
    database_url: str
    """CHASSIS_DATABASE_URL: SQLAlchemy URL; postgresql:// URLs use psycopg 3."""
    broker_url: str
    """CHASSIS_BROKER_URL: Celery broker; unset means the embedded file-system broker."""
    result_backend: str
    """CHASSIS_RESULT_BACKEND: Celery result backend (chords need one)."""
    kafka_bootstrap: str | None
    """CHASSIS_KAFKA_BOOTSTRAP: Kafka bootstrap servers; unset turns Kafka features off."""
    action_modules: tuple[str, ...] = ()
    """CHASSIS_ACTION_MODULES: comma-separated modules that register user actions."""
    visibility_timeout: int = 3600
    """CHASSIS_VISIBILITY_TIMEOUT: seconds before Redis redelivers an unacked task."""
    prefetch_multiplier: int = 4
    """CHASSIS_PREFETCH_MULTIPLIER: tasks a worker process reserves ahead."""
    log_format: str = "text"
    """CHASSIS_LOG_FORMAT: ``text`` or ``json``."""
    log_level: str = "INFO"
    """CHASSIS_LOG_LEVEL."""
    kafka_response_pattern: str = r"^system\.responses\..*"
    """CHASSIS_KAFKA_RESPONSE_PATTERN: regex (librdkafka: starts with ^) of the topics
    the bridge reads external agents' responses from."""
    kafka_dlq_topic: str = "dlq.chassis"
    """CHASSIS_KAFKA_DLQ_TOPIC: where the bridge puts messages it cannot use."""
    kafka_group: str = "chassis-bridge"
    """CHASSIS_KAFKA_GROUP: consumer group of ``chassis bridge``."""
    relay_batch_size: int = 500
    """CHASSIS_RELAY_BATCH_SIZE: outbox rows the relay publishes per transaction."""
    relay_poll_interval: float = 0.2
    """CHASSIS_RELAY_POLL_INTERVAL: seconds the relay waits when the outbox is empty."""
    embedded_broker: bool = field(default=False)
    """True when no broker URL was given (derived)."""
    ai_provider: str = "offline"
    """CHASSIS_AI_PROVIDER: ``anthropic`` (Claude) or ``offline`` (deterministic text, no
    requests). Default: ``anthropic`` when ANTHROPIC_API_KEY is set, else ``offline``."""
    anthropic_api_key: str | None = field(default=None, repr=False)
    """ANTHROPIC_API_KEY: the Claude API key (the SDK's own variable; never printed)."""
    anthropic_base_url: str | None = None
    """ANTHROPIC_BASE_URL: the Messages API's base URL (the SDK's own variable; unset
    means the SDK's default, https://api.anthropic.com)."""
    claude_haiku_model: str = DEFAULT_CLAUDE_HAIKU_MODEL
    """CHASSIS_CLAUDE_HAIKU_MODEL: model id of ``ai_text_generate_claude_haiku``."""
    claude_sonnet_model: str = DEFAULT_CLAUDE_SONNET_MODEL
    """CHASSIS_CLAUDE_SONNET_MODEL: model id of ``ai_text_generate_claude_sonnet``."""
    claude_opus_model: str = DEFAULT_CLAUDE_OPUS_MODEL
    """CHASSIS_CLAUDE_OPUS_MODEL: model id of ``ai_text_generate_claude_opus``."""
    ai_max_retries: int = 4
    """CHASSIS_AI_MAX_RETRIES: retries of a Claude request after 429, 5xx (529
    included), timeouts and connection errors; 0 turns retrying off."""
    ai_timeout: float = 300.0
    """CHASSIS_AI_TIMEOUT: seconds one Claude request may take."""
    ai_backoff: float = 1.0
    """CHASSIS_AI_BACKOFF: seconds before the first retry; doubled for each next one,
    with random jitter (half to all of it)."""
    ai_max_backoff: float = 30.0
    """CHASSIS_AI_MAX_BACKOFF: the longest wait between two tries (a server's
    retry-after is honoured up to this)."""
    ai_breaker_failures: int = 5
    """CHASSIS_AI_BREAKER_FAILURES: failures of a provider in a row (5xx, 429, 408,
    timeouts, connection errors; counted by every worker together) that open its
    circuit breaker: AI steps then wait instead of calling (see chassis.ai.breaker)."""
    ai_breaker_cooldown: float = 30.0
    """CHASSIS_AI_BREAKER_COOLDOWN: seconds an open circuit breaker stays open before
    one request probes the provider (its success closes the breaker, its failure opens
    it again)."""
    ai_rate_limit: str | None = None
    """CHASSIS_AI_RATE_LIMIT: Celery rate limit of AI step tasks per worker, e.g.
    ``60/m``; unset means no limit."""
    step_timeout: float = 3600.0
    """CHASSIS_STEP_TIMEOUT: seconds one attempt may run (or an external agent take to
    answer) when its plan sets no ``timeout``; also how long a workflow may wait for
    dependencies that never come."""
    lease_seconds: float = 15.0
    """CHASSIS_LEASE_SECONDS: a running attempt's lease, renewed by its worker every
    third of it; once it expires (the worker died) the sweep sends the attempt again."""
    agent_resend_after: float = 120.0
    """CHASSIS_AGENT_RESEND_AFTER: seconds an agent's request may go unanswered before the
    sweep asks again (the same request; then after 3x, 7x, 15x... that long); 0: never."""
    redispatch_after: float = 20.0
    """CHASSIS_REDISPATCH_AFTER: seconds a dispatched attempt may wait unclaimed, while
    its queue is empty, before the sweep sends it again (a message lost by the broker or
    a failed publish); doubled after each re-send, and ten times as long while the queue
    holds messages (it may just be waiting its turn)."""
    max_deliveries: int = 3
    """CHASSIS_MAX_DELIVERIES: times one attempt may be started before a worker losing
    it once more fails the attempt (error type WorkerLost): a step that kills its
    worker cannot loop for ever."""
    sweep_interval: float = 5.0
    """CHASSIS_SWEEP_INTERVAL: seconds between two ``chassis.sweep`` tasks sent by beat
    (retries due, lost and timed-out attempts are found at this pace)."""
    prune_after_days: float | None = None
    """CHASSIS_PRUNE_AFTER_DAYS: beat removes finished workflows unchanged for this many
    days, daily (``chassis prune``); unset (the default): nothing is removed."""
    result_expires: int = 86400
    """CHASSIS_RESULT_EXPIRES: seconds Celery keeps task results (Redis expires them
    itself; the others are cleaned by beat's ``celery.backend_cleanup``)."""
    metrics_port: int = 9808
    """CHASSIS_METRICS_PORT: port of ``chassis metrics`` (Prometheus text)."""
    web_host: str = "127.0.0.1"
    """CHASSIS_WEB_HOST: address ``chassis web`` listens on."""
    web_port: int = 8000
    """CHASSIS_WEB_PORT: port of ``chassis web`` (the HTTP API and web console)."""
    web_rate_limit: int = 0
    """CHASSIS_WEB_RATE_LIMIT: requests a minute one API key may make to the HTTP API
    (every ``/api/`` request, by Bearer or by the console's cookie), per ``chassis web``
    process; 0: no limit."""
    client_id: str = "local"
    """CHASSIS_CLIENT_ID: the client a ``Client`` (and the CLI) acts for by default."""
    max_document_bytes: int = 1_048_576
    """CHASSIS_MAX_DOCUMENT_BYTES: largest JSON document taken from outside (an input,
    feedback, an agent's answer, a plan file)."""
    max_depth: int = 64
    """CHASSIS_MAX_DEPTH: deepest nesting of lists and maps in such a document."""
    template_timeout: float = 2.0
    """CHASSIS_TEMPLATE_TIMEOUT: seconds a prompt template may take to render."""
    template_max_bytes: int = 1_048_576
    """CHASSIS_TEMPLATE_MAX_BYTES: largest rendered prompt, in bytes."""
    fuel_prices: str | None = None
    """CHASSIS_FUEL_PRICES: a JSON or YAML file of token prices overriding the default
    table (see ``chassis fuel prices``); checked when the settings are read."""

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    @property
    def limits(self) -> Limits:
        return Limits(max_bytes=self.max_document_bytes, max_depth=self.max_depth)


def normalize_database_url(url: str) -> str:
    """Use psycopg 3 for plain postgresql:// URLs (psycopg2 is not a dependency)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _number(env: Mapping[str, str], name: str, default: float, *, least: float = 0.0,
            most: float | None = None, integer: bool = False) -> float:
    """A number variable; ConfigError (naming it) when it is not one, or is out of
    [least, most] (most: 2**31-1 for whole numbers, a billion seconds for others)."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    top = most if most is not None else (INT32_MAX if integer else 1e9)
    value = math.nan
    if raw.isascii():
        try:
            value = (int(raw) if len(raw) < 20 else math.nan) if integer else float(raw)
        except ValueError:
            pass
    if not (math.isfinite(value) and least <= value <= top):
        what, low, high = (("a whole number", f"{least:.0f}", f"{top:.0f}") if integer
                           else ("a number", f"{least:g}", f"{top:g}"))
        raise ConfigError(f"{name} must be {what} from {low} to {high}, got {raw[:60]!r}")
    return value


def _url(name: str, raw: str, schemes: Collection[str]) -> str:
    """A broker or result backend URL whose scheme Celery knows (``a+b://`` by its
    ``a``; ``;``-separated fail-over lists each); ConfigError otherwise, before
    anything is connected to or written."""
    for url in raw.split(";"):
        scheme, sep, _ = url.strip().partition("://")
        if not sep or scheme.split("+")[0].lower() not in schemes:
            raise ConfigError(f"{name} must be a URL such as redis://host:6379/0 or "
                              f"amqp://user:password@host:5672//, got {url.strip()[:80]!r} "
                              f"(known: {', '.join(sorted({k.lower() for k in schemes}))})")
    return raw


def _choice(env: Mapping[str, str], name: str, default: str, choices: Collection[str]) -> str:
    raw = (env.get(name) or "").strip() or default
    value = raw.lower() if default.islower() else raw.upper()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw[:60]!r}")
    return value


def _ai_provider(env: Mapping[str, str], api_key: str | None) -> str:
    provider = (env.get("CHASSIS_AI_PROVIDER") or "").strip().lower()
    if not provider:
        return "anthropic" if api_key else "offline"
    if provider not in AI_PROVIDERS:
        raise ConfigError(f"CHASSIS_AI_PROVIDER must be one of {', '.join(AI_PROVIDERS)}, "
                          f"got {provider!r}")
    return provider


def _rate_limit(env: Mapping[str, str]) -> str | None:
    raw = (env.get("CHASSIS_AI_RATE_LIMIT") or "").strip()
    if raw and not _RATE_LIMIT.match(raw):
        raise ConfigError(f"CHASSIS_AI_RATE_LIMIT must be a Celery rate limit such as "
                          f"'60/m', '2/s' or '1000/h', got {raw!r}")
    return raw or None


def _client_id(env: Mapping[str, str]) -> str:
    raw = env.get("CHASSIS_CLIENT_ID") or "local"
    try:
        return check_name(raw.strip(), "CHASSIS_CLIENT_ID")
    except InputError as exc:
        raise ConfigError(str(exc)) from None


def _fuel_prices(env: Mapping[str, str]) -> str | None:
    """CHASSIS_FUEL_PRICES, once the file it names is known to be a good price table."""
    raw = (env.get("CHASSIS_FUEL_PRICES") or "").strip() or None
    if raw is not None:
        from chassis.pricing import load_prices

        load_prices(raw)  # ConfigError saying what is wrong
    return raw


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``env`` (default: the process environment)."""
    env = os.environ if env is None else env
    from chassis import tracing

    tracing.check(env)  # (OTEL_* it cannot honour: one line now, not failed steps later)
    home = Path(env.get("CHASSIS_HOME") or Path.cwd() / ".chassis").resolve()
    database_url = normalize_database_url(
        env.get("CHASSIS_DATABASE_URL") or f"sqlite:///{home / 'chassis.db'}"
    )
    broker = (env.get("CHASSIS_BROKER_URL") or "").strip()
    embedded = not broker
    if embedded:
        broker = "filesystem://"
    _url("CHASSIS_BROKER_URL", broker, TRANSPORT_ALIASES)
    backend = (env.get("CHASSIS_RESULT_BACKEND") or "").strip()
    if backend:
        _url("CHASSIS_RESULT_BACKEND", backend, BACKEND_ALIASES)
    else:
        if broker.startswith(("redis://", "rediss://")):
            backend = broker
        else:
            backend = f"file://{home / 'results'}"
    api_key = (env.get("ANTHROPIC_API_KEY") or "").strip() or None
    return Settings(
        home=home,
        database_url=database_url,
        broker_url=broker,
        result_backend=backend,
        kafka_bootstrap=env.get("CHASSIS_KAFKA_BOOTSTRAP") or None,
        action_modules=_split(env.get("CHASSIS_ACTION_MODULES")),
        visibility_timeout=int(_number(env, "CHASSIS_VISIBILITY_TIMEOUT", 3600, least=1,
                                       integer=True)),
        prefetch_multiplier=int(_number(env, "CHASSIS_PREFETCH_MULTIPLIER", 4, least=1,
                                        integer=True)),
        log_format=_choice(env, "CHASSIS_LOG_FORMAT", "text", ("text", "json")),
        log_level=_choice(env, "CHASSIS_LOG_LEVEL", "INFO",
                          ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
        kafka_response_pattern=(env.get("CHASSIS_KAFKA_RESPONSE_PATTERN")
                                or Settings.kafka_response_pattern),
        kafka_dlq_topic=env.get("CHASSIS_KAFKA_DLQ_TOPIC") or Settings.kafka_dlq_topic,
        kafka_group=env.get("CHASSIS_KAFKA_GROUP") or Settings.kafka_group,
        relay_batch_size=int(_number(env, "CHASSIS_RELAY_BATCH_SIZE", Settings.relay_batch_size,
                                     least=1, integer=True)),
        relay_poll_interval=_number(env, "CHASSIS_RELAY_POLL_INTERVAL",
                                    Settings.relay_poll_interval, least=0.001),
        embedded_broker=embedded,
        ai_provider=_ai_provider(env, api_key),
        anthropic_api_key=api_key,
        anthropic_base_url=env.get("ANTHROPIC_BASE_URL") or None,
        claude_haiku_model=env.get("CHASSIS_CLAUDE_HAIKU_MODEL") or DEFAULT_CLAUDE_HAIKU_MODEL,
        claude_sonnet_model=(env.get("CHASSIS_CLAUDE_SONNET_MODEL")
                             or DEFAULT_CLAUDE_SONNET_MODEL),
        claude_opus_model=env.get("CHASSIS_CLAUDE_OPUS_MODEL") or DEFAULT_CLAUDE_OPUS_MODEL,
        ai_max_retries=int(_number(env, "CHASSIS_AI_MAX_RETRIES", 4, integer=True)),
        ai_timeout=_number(env, "CHASSIS_AI_TIMEOUT", 300.0, least=0.001),
        ai_backoff=_number(env, "CHASSIS_AI_BACKOFF", 1.0),
        ai_max_backoff=_number(env, "CHASSIS_AI_MAX_BACKOFF", 30.0),
        ai_breaker_failures=int(_number(env, "CHASSIS_AI_BREAKER_FAILURES", 5, least=1,
                                        integer=True)),
        ai_breaker_cooldown=_number(env, "CHASSIS_AI_BREAKER_COOLDOWN", 30.0, least=0.001,
                                    most=86400.0),
        ai_rate_limit=_rate_limit(env),
        step_timeout=_number(env, "CHASSIS_STEP_TIMEOUT", 3600.0, least=0.001),
        lease_seconds=_number(env, "CHASSIS_LEASE_SECONDS", 15.0, least=1.0),
        redispatch_after=_number(env, "CHASSIS_REDISPATCH_AFTER", 20.0, least=0.001),
        agent_resend_after=_number(env, "CHASSIS_AGENT_RESEND_AFTER", 120.0, least=0.0),
        max_deliveries=int(_number(env, "CHASSIS_MAX_DELIVERIES", 3, least=1, integer=True)),
        sweep_interval=_number(env, "CHASSIS_SWEEP_INTERVAL", 5.0, least=0.001),
        prune_after_days=(_number(env, "CHASSIS_PRUNE_AFTER_DAYS", 0.0, least=1, most=36500)
                          if (env.get("CHASSIS_PRUNE_AFTER_DAYS") or "").strip() else None),
        result_expires=int(_number(env, "CHASSIS_RESULT_EXPIRES", 86400, integer=True)),
        metrics_port=int(_number(env, "CHASSIS_METRICS_PORT", 9808, least=1, most=65535,
                                 integer=True)),
        web_host=(env.get("CHASSIS_WEB_HOST") or "").strip() or "127.0.0.1",
        web_port=int(_number(env, "CHASSIS_WEB_PORT", 8000, least=1, most=65535,
                             integer=True)),
        web_rate_limit=int(_number(env, "CHASSIS_WEB_RATE_LIMIT", 0, least=0,
                                   most=1_000_000, integer=True)),
        client_id=_client_id(env),
        max_document_bytes=int(_number(env, "CHASSIS_MAX_DOCUMENT_BYTES", 1_048_576,
                                       least=1024, most=256 * 1_048_576, integer=True)),
        max_depth=int(_number(env, "CHASSIS_MAX_DEPTH", 64, least=2, most=500,
                              integer=True)),
        template_timeout=_number(env, "CHASSIS_TEMPLATE_TIMEOUT", 2.0, least=0.01),
        template_max_bytes=int(_number(env, "CHASSIS_TEMPLATE_MAX_BYTES", 1_048_576,
                                       least=1024, most=256 * 1_048_576, integer=True)),
        fuel_prices=_fuel_prices(env),
    )
