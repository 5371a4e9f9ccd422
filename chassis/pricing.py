"""Token prices: what an AI attempt costs in fuel, by the tokens it used.

Prices are in fuel per million tokens, per model family (``haiku``, ``sonnet``,
``opus``), for input, output, cache-write and cache-read tokens. One fuel is meant as a
tenth of a US cent at Anthropic's list prices (Claude Haiku 4.5 $1/$5, Sonnet 4.5
$3/$15, Opus 4.5 $5/$25 per million input/output tokens; cache writes 1.25 times the
input price, cache reads a tenth of it). Each family also has a ``floor``: the
original platform's static price of a call (10, 25, 50), the least an answered call
costs.

``CHASSIS_FUEL_PRICES`` names a JSON or YAML file that overrides the table::

    models:
      sonnet: {input: 3000, output: 15000, cache_write: 3750, cache_read: 300, floor: 25}
      claude-opus-4-1: {input: 15000, output: 75000}   # one model id of a family

An entry for a model id takes what it does not say from its family's entry. A model is
priced by its id's entry if there is one, else by the family its id names; a model of
no known family is priced as the dearest family (never below what it may cost).
``chassis fuel prices`` prints the table in force.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from chassis.errors import ConfigError
from chassis.limits import INT32_MAX

FAMILIES = ("haiku", "sonnet", "opus")
#: Fields of a price entry.
FIELDS = ("input", "output", "cache_write", "cache_read", "floor")
#: Characters of prompt per token assumed when estimating a request's input.
CHARS_PER_TOKEN = 3
#: The largest input estimate (a model's context window at most).
MAX_INPUT_ESTIMATE = 1_000_000
#: The AI actions priced by tokens (the tiers, and ``ai_text_generate`` by params.model).
TIER_ACTIONS = {f"ai_text_generate_claude_{t}": t for t in FAMILIES}
AI_ACTIONS = frozenset({*TIER_ACTIONS, "ai_text_generate"})


@dataclass(frozen=True)
class ModelPrice:
    """Fuel per million tokens of each kind, and the least an answered call costs."""

    input: int
    output: int
    cache_write: int
    cache_read: int
    floor: int

    def of(self, usage: Mapping[str, Any] | None) -> int:
        """The fuel a call with this usage costs: its tokens at these prices, rounded
        up, never below the floor. No usage (unknown): the floor. Zero tokens (no model
        answered: an error, a request never sent): nothing."""
        if usage is None:
            return self.floor
        tokens = [_tokens(usage, k) for k in ("input_tokens", "output_tokens",
                                              "cache_creation_input_tokens",
                                              "cache_read_input_tokens")]
        if not any(tokens):
            return 0
        micro = (tokens[0] * self.input + tokens[1] * self.output
                 + tokens[2] * self.cache_write + tokens[3] * self.cache_read)
        return max(self.floor, -(-micro // 1_000_000))

    def worst_case(self, max_tokens: int, input_tokens: int) -> int:
        """What a call may cost at most: ``max_tokens`` of output and the estimated
        input (as if all of it were written to the cache, the dearer input price),
        rounded up, never below the floor."""
        dear = max(self.input, self.cache_write)
        micro = max_tokens * self.output + input_tokens * dear
        return max(self.floor, -(-micro // 1_000_000))


def _tokens(usage: Mapping[str, Any], key: str) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


DEFAULT_PRICES: Mapping[str, ModelPrice] = {
    "haiku": ModelPrice(input=1000, output=5000, cache_write=1250, cache_read=100, floor=10),
    "sonnet": ModelPrice(input=3000, output=15000, cache_write=3750, cache_read=300,
                         floor=25),
    "opus": ModelPrice(input=5000, output=25000, cache_write=6250, cache_read=500, floor=50),
}


def family_of(model: str) -> str | None:
    """The family a model id names (``claude-sonnet-4-5`` → sonnet); None if none."""
    lowered = model.lower()
    found = [f for f in FAMILIES if f in lowered]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class PriceTable:
    """Prices by family and by model id (see the module's documentation)."""

    entries: Mapping[str, ModelPrice]
    source: str = "default"

    def price(self, model: str) -> tuple[str, ModelPrice]:
        """(the entry used, its price) for a model id or a family name."""
        for name in (model, model.lower()):
            if name in self.entries:
                return name, self.entries[name]
        family = family_of(model)
        if family is not None and family in self.entries:
            return family, self.entries[family]
        dearest = max(FAMILIES, key=lambda f: (self.entries[f].output, self.entries[f].input))
        return dearest, self.entries[dearest]

    def as_dict(self) -> dict[str, Any]:
        """The table as ``chassis fuel prices --json`` prints it."""
        return {"source": self.source, "unit": "fuel per million tokens",
                "models": {k: asdict(v) for k, v in self.entries.items()}}


DEFAULT_TABLE = PriceTable(DEFAULT_PRICES)


def parse_prices(data: Any, source: str) -> PriceTable:
    """The table a price file describes (over the defaults); ConfigError saying what is
    wrong otherwise."""
    if not isinstance(data, dict) or set(data) != {"models"} or not isinstance(
            data["models"], dict):
        raise ConfigError(f"{source}: a price file is a mapping with one key, models: "
                          "{family or model id: {input, output, cache_write, cache_read, "
                          "floor}}")
    entries = dict(DEFAULT_PRICES)
    models: dict[str, Any] = data["models"]
    seen: set[str] = set()
    # families first: a model id takes what it does not say from its family's new entry
    for raw_key in sorted(models, key=lambda k: str(k).lower() not in FAMILIES):
        spec = models[raw_key]
        if not isinstance(raw_key, str) or not raw_key.strip() or len(raw_key) > 255:
            raise ConfigError(f"{source}: model names are non-empty text of at most 255 "
                              f"characters, got {raw_key!r}")
        key = raw_key.strip().lower()  # (model ids are lower case; Sonnet is sonnet)
        if key in seen:
            raise ConfigError(f"{source}: {raw_key!r} names an entry given twice")
        seen.add(key)
        family = key if key in FAMILIES else family_of(key)
        if family is None:
            raise ConfigError(f"{source}: unknown model {raw_key!r}: an entry is a family "
                              f"({', '.join(FAMILIES)}) or a Claude model id naming one")
        if not isinstance(spec, dict) or not spec:
            raise ConfigError(f"{source}: models.{key} must be a mapping of "
                              f"{', '.join(FIELDS)}")
        unknown = sorted(set(spec) - set(FIELDS))
        if unknown:
            raise ConfigError(f"{source}: models.{key}: unknown field(s) {', '.join(unknown)} "
                              f"(known: {', '.join(FIELDS)})")
        for name, value in spec.items():
            if (isinstance(value, bool) or not isinstance(value, int)
                    or not 0 <= value <= INT32_MAX):
                raise ConfigError(f"{source}: models.{key}.{name} must be a whole number "
                                  f"from 0 to {INT32_MAX}, got {value!r}")
        entries[key] = replace(entries[family], **spec)
    return PriceTable(entries, source)


def load_prices(path: str | None) -> PriceTable:
    """The table in force: the defaults, or the file ``path`` (CHASSIS_FUEL_PRICES)."""
    if not path:
        return DEFAULT_TABLE
    return _load(path)


@functools.lru_cache(maxsize=8)
def _load(path: str) -> PriceTable:
    from chassis.plan import _PlanLoader  # JSON types only, no alias bombs

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"CHASSIS_FUEL_PRICES: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"CHASSIS_FUEL_PRICES: {path}: cannot read: {exc}") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError):
        try:
            data = yaml.load(text, Loader=_PlanLoader)  # noqa: S506 (a SafeLoader)
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise ConfigError(f"CHASSIS_FUEL_PRICES: {path}: not JSON or YAML ({reason})") \
                from None
    return parse_prices(data, f"CHASSIS_FUEL_PRICES: {path}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def input_estimate(texts: list[str], data: Mapping[str, Any]) -> int:
    """Tokens a prompt may have: its templates, and every value of ``data`` (the step's
    data by top-level name) whose name they mention, at CHARS_PER_TOKEN characters a
    token."""
    chars = sum(len(t) for t in texts)
    joined = "\n".join(texts)
    for name, value in data.items():
        if name and name in joined:
            chars += len(value) if isinstance(value, str) else len(
                json.dumps(value, default=str))
    return min(MAX_INPUT_ESTIMATE, math.ceil(chars / CHARS_PER_TOKEN))


#: (price file, haiku, sonnet, opus model ids) of the settings a Client was made with.
_configured: list[tuple[str | None, ...]] = []


def configure(settings: Any) -> None:
    """Price with these settings (CHASSIS_FUEL_PRICES and the tier models) in this
    process from now on: a :class:`chassis.api.Client` (and so every worker) does this
    with its own settings."""
    _configured[:] = [(settings.fuel_prices, settings.claude_haiku_model,
                       settings.claude_sonnet_model, settings.claude_opus_model)]


def in_force() -> tuple[PriceTable, Mapping[str, str]]:
    """(the price table, the model id of each tier) of this process: its Client's
    settings, else its environment (CHASSIS_FUEL_PRICES, CHASSIS_CLAUDE_<TIER>_MODEL)."""
    import os

    from chassis import config

    key = _configured[0] if _configured else tuple(
        os.environ.get(v) for v in ("CHASSIS_FUEL_PRICES", "CHASSIS_CLAUDE_HAIKU_MODEL",
                                    "CHASSIS_CLAUDE_SONNET_MODEL", "CHASSIS_CLAUDE_OPUS_MODEL"))
    return _in_force(key, config)


@functools.lru_cache(maxsize=8)
def _in_force(key: tuple[str | None, ...], config: Any) -> tuple[PriceTable, Mapping[str, str]]:
    path, haiku, sonnet, opus = key
    return load_prices(path), {
        "haiku": haiku or config.DEFAULT_CLAUDE_HAIKU_MODEL,
        "sonnet": sonnet or config.DEFAULT_CLAUDE_SONNET_MODEL,
        "opus": opus or config.DEFAULT_CLAUDE_OPUS_MODEL}


def resolve(action: str, params: Mapping[str, Any]) -> tuple[str, ModelPrice]:
    """(model id, price) of an AI action's attempt: a tier action's model is its
    tier's; ``ai_text_generate``'s is ``params.model`` (a tier name or a model id)."""
    table, tiers = in_force()
    tier = TIER_ACTIONS.get(action)
    if tier is not None:
        model = tiers[tier]
    else:
        raw = params.get("model")
        model = raw.strip() if isinstance(raw, str) and raw.strip() else ""
        model = tiers.get(model, model)
    return model or "-", table.price(model)[1]
