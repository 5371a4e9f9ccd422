"""Cases: a workload, its size, and the metrics read off each run's :class:`Sample`.

The runner warms every system up (runs discarded), then runs the systems in alternating
order ``runs`` times (ours, peers, then reversed, ...) so slow drift of the machine is
shared, and reports medians. Ratios are ours / peer; for a metric where higher is better
(throughput), a target is a minimum instead of a maximum. Targets are per peer: issue
13's (agent: ahead of DBOS; per step at most 1.3x DBOS; concurrent throughput at least
2x DBOS's; fan-out at most 1.2x a raw chord) and issue 7's (per step at most 1.5x a raw
Celery hop). A check metric (lost or double debits) is the worst run's value and must
equal its ``expect``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.env import CpuMeter, RssSampler, log
from bench.systems import Sample, System

TARGET_RATIO = 1.5


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    read: Callable[[Sample], float | None]
    better: str = "lower"  # or "higher"
    targets: Mapping[str, float] = field(default_factory=dict)
    """Bound on ours/peer, per peer: a maximum when lower is better, a minimum otherwise."""
    expect: float | None = None
    """A check: every run's value must equal this (reported: the worst run's value)."""

    def target(self, peer: str) -> float | None:
        return self.targets.get(peer)

    def meets(self, peer: str, ratio: float | None) -> bool | None:
        t = self.target(peer)
        if ratio is None or t is None:
            return None
        return ratio <= t if self.better == "lower" else ratio >= t

    def aggregate(self, xs: Sequence[float | None]) -> float | None:
        if self.expect is None:
            return _median(xs)
        vals = [x for x in xs if x is not None]
        return max(vals, key=lambda v: abs(v - self.expect)) if vals else None  # type: ignore[operator]


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    workload: str  # the System method that runs it
    size: int
    metrics: tuple[Metric, ...]  # the first is the case's headline figure
    params: Mapping[str, Any] = field(default_factory=dict)  # more workload arguments


VS_RAW = {"raw_celery": TARGET_RATIO}
WALL = Metric("wall", "s", lambda s: s.wall_s)
PER_STEP = Metric("per_step", "ms", lambda s: s.per_step_ms,
                  targets={**VS_RAW, "dbos": 1.3})
"""Issue 7: at most 1.5x a raw Celery hop; issue 13: at most 1.3x DBOS's step."""
WORKER_CPU = Metric("worker_cpu", "s", lambda s: s.detail.get("worker_cpu_s"))
"""CPU seconds of the system's processes per run (the Celery worker's tree; the DBOS
process): steadier than wall time on a busy machine; informative (no target)."""
PG_CPU = Metric("postgres_cpu", "s", lambda s: s.detail.get("postgres_cpu_s"))
"""CPU seconds of the PostgreSQL backends connected to the system's database."""
WF_PER_S = Metric("throughput", "wf/s", lambda s: s.detail.get("wf_per_s"), better="higher",
                  targets={"dbos": 2.0})
"""Issue 13: at least twice DBOS's throughput."""
DEBITS_PER_S = Metric("debits", "debits/s", lambda s: s.detail.get("debits_per_s"),
                      better="higher")
LOST = Metric("lost_debits", "debits", lambda s: s.detail.get("lost_debits"), expect=0)
DOUBLE = Metric("double_debits", "debits", lambda s: s.detail.get("double_debits"), expect=0)
MISMATCHED = Metric("mismatched_workflows", "workflows",
                    lambda s: s.detail.get("mismatched_workflows"), expect=0)
"""Workflows whose ledger sum, fuel_spent and the plan's price disagree."""


AGENT_WALL = Metric("wall", "s", lambda s: s.wall_s, targets={"dbos": 1.0})
"""The agent case's wall time: to be ahead of DBOS (at most 1.0 of its time)."""
VS_IDEAL = Metric("vs_ideal", "x", lambda s: s.detail.get("vs_ideal"))
"""Wall time over the ideal (steps x latency: every workflow's steps back to back)."""


GROWTH = Metric("end_over_start", "x", lambda s: s.detail.get("end_over_start"))
"""The growth case: the gap between steps at the end over the gap at the start (issue
13: at most 1.3)."""
GAP_START = Metric("gap_start", "ms", lambda s: s.detail.get("gap_start_ms"))
GAP_END = Metric("gap_end", "ms", lambda s: s.detail.get("gap_end_ms"))


def cases(linear_steps: int = 100, fanout_width: int = 500, concurrent: int = 200,
          concurrent_steps: int = 3, fuel_workflows: int = 8,
          fuel_steps: int = 25, agent_workflows: int = 1000,
          agent_latency: float = 1.0, growth_steps: int = 1000,
          growth_bytes: int = 10_240) -> dict[str, Case]:
    return {
        "growth": Case("growth", f"growth: one workflow of {growth_steps} steps, each "
                       f"adding a {growth_bytes / 1024:g} KB output", "growth", growth_steps,
                       (GROWTH, GAP_START, GAP_END, WALL, WORKER_CPU, PG_CPU),
                       {"size": growth_bytes}),
        "agent": Case("agent", f"agent: {agent_workflows} workflows x 3 steps of "
                      f"{agent_latency:g} s model latency", "agent", agent_workflows,
                      (AGENT_WALL, VS_IDEAL, WORKER_CPU, PG_CPU),
                      {"steps": 3, "latency": agent_latency}),
        "linear": Case("linear", f"linear, {linear_steps} no-op steps", "linear",
                       linear_steps, (PER_STEP, WALL, WORKER_CPU, PG_CPU)),
        "concurrent": Case("concurrent", f"{concurrent} workflows of {concurrent_steps} "
                           "steps at once", "concurrent", concurrent,
                           (WF_PER_S, WALL, WORKER_CPU, PG_CPU),
                           {"steps": concurrent_steps}),
        "fanout": Case("fanout", f"fan-out of {fanout_width} sub-tasks and back",
                       "fanout", fanout_width,
                       (Metric("wall", "s", lambda s: s.wall_s,
                               targets={"raw_celery": 1.2}),  # issue 13: a raw chord
                        WORKER_CPU, PG_CPU)),
        "fuel": Case("fuel", f"fuel: {fuel_workflows} workflows of one client, "
                     f"{fuel_steps} steps each", "fuel", fuel_steps,
                     (DEBITS_PER_S, LOST, DOUBLE, MISMATCHED, WALL, WORKER_CPU, PG_CPU),
                     {"workflows": fuel_workflows}),
    }


def _median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def run_case(case: Case, systems: Sequence[System], runs: int, warmup: int = 1,
             ours: str = "ours", rss: RssSampler | None = None,
             warmup_size: int | None = None) -> dict[str, Any]:
    """Warm up, run, and reduce to one entry of ``latest.json``. ``warmup_size``: a
    smaller workload for the warm-up runs (``--quick``)."""
    active = [s for s in systems if s.supports(case.workload)]
    params = dict(case.params)

    def run(s: System, size: int) -> Sample:
        if rss is not None:
            rss.label = s.key
        try:
            return getattr(s, case.workload)(size, **params)
        finally:
            if rss is not None:
                rss.label = None

    for w in range(warmup):
        for s in active:
            sample = run(s, warmup_size or case.size)
            log(f"{case.name}: warm-up {w + 1}/{warmup} {s.key}: wall {sample.wall_s:.3f} s")
    samples: dict[str, list[Sample]] = {s.key: [] for s in active}
    for r in range(runs):
        order = active if r % 2 == 0 else list(reversed(active))
        for s in order:
            meter = CpuMeter(s.pids) if s.pids is not None else None
            if meter is not None:
                meter.start()
            sample = run(s, case.size)
            if meter is not None:
                sample.detail.update(meter.stop())
            samples[s.key].append(sample)
            figs = ", ".join(f"{m.name} {_fmt(m.read(sample))} {m.unit}" for m in case.metrics)
            log(f"{case.name}: run {r + 1}/{runs} {s.key}: {figs}")

    metrics: dict[str, Any] = {}
    for m in case.metrics:
        agg = {k: m.aggregate([m.read(x) for x in v]) for k, v in samples.items()}
        mine = agg.get(ours)
        peers = {k: v for k, v in agg.items() if k != ours}
        ratios = ({} if m.expect is not None else
                  {k: (mine / v if mine is not None and v else None) for k, v in peers.items()})
        metrics[m.name] = {
            "unit": m.unit, "better": m.better,
            "targets": {k: m.target(k) for k in peers if m.target(k) is not None},
            "expect": m.expect,
            "ours": mine, "peers": peers, "ratios": ratios,
            "meets_target": ({k: m.meets(k, r) for k, r in ratios.items()
                              if m.target(k) is not None} if m.expect is None else
                             {k: v == m.expect for k, v in agg.items()}),
            "samples": {k: [m.read(x) for x in v] for k, v in samples.items()},
        }
    detail = {k: {d: _median([x.detail.get(d) for x in v])
                  for d in sorted({d for x in v for d in x.detail})}
              for k, v in samples.items()}
    head = metrics[case.metrics[0].name]
    return {"name": case.name, "title": case.title, "size": case.size,
            "params": dict(case.params),
            "metric": case.metrics[0].name, "unit": head["unit"], "better": head["better"],
            "ours": head["ours"], "peers": head["peers"], "ratios": head["ratios"],
            "targets": head["targets"], "meets_target": head["meets_target"],
            "metrics": metrics, "detail_medians": detail, "runs": runs, "warmup": warmup,
            "warmup_size": warmup_size or case.size}
