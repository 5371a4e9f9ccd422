"""The plan registry: named, versioned plans in the database.

``register(name, plan)`` stores a validated plan under ``name``. The same content again
is a no-op that returns the existing version; new content becomes the next version.
The database decides both: unique (name, version) and unique (name, content_hash), so
two processes registering at once cannot create a gap, a duplicate or the same content
twice. A workflow started from a registered plan keeps its own snapshot of it; later
versions never change a running workflow.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from chassis.errors import ChassisError, InputError, PlanNotFound
from chassis.limits import INT32_MAX
from chassis.plan import Plan, parse_plan, plan_to_dict
from chassis.store.tables import plans

#: A plan name: it also names the Kafka start topic ``system.agent.<name>.process``.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
_MAX_RETRIES = 20

__all__ = ["PlanNotFound", "PlanRegistry", "RegisteredPlan", "Registration", "content_hash",
           "parse_ref"]


@dataclass(frozen=True)
class RegisteredPlan:
    """One version of a named plan."""

    name: str
    version: int
    content: dict[str, Any]
    """The plan as JSON data (``plan_to_dict``)."""
    content_hash: str
    created_at: datetime

    @property
    def plan(self) -> Plan:
        return parse_plan(self.content)


@dataclass(frozen=True)
class Registration:
    """What ``register`` did: ``created`` is False when the content was already there."""

    plan: RegisteredPlan
    created: bool


def content_hash(plan: Plan) -> str:
    """SHA-256 of the plan's canonical JSON: equal plans hash equal, whatever the file
    format, key order or layout they were written in."""
    text = json.dumps(plan_to_dict(plan), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_name(name: str) -> str:
    """``name`` when it is a valid plan name, else InputError saying what is allowed."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InputError(f"invalid plan name {name!r}: use letters, digits, '_', '-' and "
                         "'.', starting with a letter or digit (at most 255 characters)")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``name`` or ``name@version`` → (name, version or None for the latest)."""
    name, sep, version = ref.rpartition("@")
    if not sep:
        return check_name(ref), None
    if not (version.isascii() and version.isdigit() and len(version) <= 10
            and 1 <= int(version) <= INT32_MAX):
        raise InputError(f"invalid plan version in {ref[:300]!r}: expected NAME@N, "
                         f"N from 1 to {INT32_MAX}")
    return check_name(name), int(version)


def _row(row: Any) -> RegisteredPlan:
    m = row._mapping
    return RegisteredPlan(m["name"], m["version"], dict(m["content"]), m["content_hash"],
                          m["created_at"])


class PlanRegistry:
    """Named plans stored with SQLAlchemy (the same database as the workflows)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def register(self, name: str, plan: Plan) -> Registration:
        """Store ``plan`` (already validated) under ``name``; see the module docstring."""
        check_name(name)
        digest = content_hash(plan)
        content = plan_to_dict(plan)
        for _ in range(_MAX_RETRIES):
            existing = self._by_hash(name, digest)
            if existing is not None:
                return Registration(existing, created=False)
            try:
                with self.engine.begin() as conn:
                    latest = conn.execute(sa.select(sa.func.max(plans.c.version))
                                          .where(plans.c.name == name)).scalar()
                    row = conn.execute(plans.insert().values(
                        name=name, version=(latest or 0) + 1, content=content,
                        content_hash=digest, created_at=datetime.now(UTC))
                        .returning(*plans.c)).one()
                return Registration(_row(row), created=True)
            except IntegrityError:
                continue  # another process registered this name at the same moment
        raise ChassisError(f"plan {name!r}: too much contention, gave up registering")

    def _by_hash(self, name: str, digest: str) -> RegisteredPlan | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(plans).where(
                plans.c.name == name, plans.c.content_hash == digest)).first()
        return None if row is None else _row(row)

    def get(self, name: str, version: int | None = None) -> RegisteredPlan:
        """A version of ``name`` (default the latest); PlanNotFound when there is none."""
        if version is not None and not (isinstance(version, int) and 1 <= version <= INT32_MAX):
            raise PlanNotFound(f"no version {version!r} of plan {name!r}")
        q = sa.select(plans).where(plans.c.name == name)
        q = (q.where(plans.c.version == version) if version is not None
             else q.order_by(plans.c.version.desc()).limit(1))
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        if row is None:
            what = f"version {version} of plan {name!r}" if version else f"plan {name!r}"
            raise PlanNotFound(f"no registered {what}; see `chassis plan list`, or "
                               f"`chassis plan register {name} FILE`")
        return _row(row)

    def latest_version(self, name: str) -> int | None:
        """The newest version number of ``name``, None when it is not registered."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(plans.c.version))
                                .where(plans.c.name == name)).scalar()

    def list_plans(self) -> list[dict[str, Any]]:
        """Every name with its latest version, number of versions and dates."""
        q = (sa.select(plans.c.name, sa.func.max(plans.c.version).label("latest"),
                       sa.func.count().label("versions"),
                       sa.func.min(plans.c.created_at).label("first_registered"),
                       sa.func.max(plans.c.created_at).label("last_registered"))
             .group_by(plans.c.name).order_by(plans.c.name))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q).all()]

    def versions(self, name: str) -> list[RegisteredPlan]:
        """Every version of ``name``, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(plans).where(plans.c.name == name)
                                .order_by(plans.c.version)).all()
        return [_row(r) for r in rows]
