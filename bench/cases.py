"""Cases: a workload, its size, and the metrics read off each run's :class:`Sample`.

The runner warms every system up (runs discarded), then runs the systems in alternating
order ``runs`` times (ours, peer, peer, ours, ...) so slow drift of the machine is shared,
and reports medians. Ratios are ours / peer; for a metric where higher is better (issue
7's throughput), the target is a minimum instead of a maximum.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.env import CpuMeter, log
from bench.systems import Sample, System

TARGET_RATIO = 1.5


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    read: Callable[[Sample], float | None]
    better: str = "lower"  # or "higher"
    target: float | None = TARGET_RATIO
    """Bound on ours/peer: a maximum when lower is better, a minimum otherwise."""

    def meets(self, ratio: float | None) -> bool | None:
        if ratio is None or self.target is None:
            return None
        return ratio <= self.target if self.better == "lower" else ratio >= self.target


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    workload: str  # the System method that runs it
    size: int
    metrics: tuple[Metric, ...]  # the first is the case's headline figure


WALL = Metric("wall", "s", lambda s: s.wall_s)
PER_STEP = Metric("per_step", "ms", lambda s: s.per_step_ms)
WORKER_CPU = Metric("worker_cpu", "s", lambda s: s.detail.get("worker_cpu_s"), target=None)
"""CPU seconds of the worker's processes per run: steadier than wall time on a busy
machine; informative (no target)."""


def cases(linear_steps: int = 100, fanout_width: int = 500) -> dict[str, Case]:
    return {
        "linear": Case("linear", f"linear, {linear_steps} no-op steps", "linear",
                       linear_steps, (PER_STEP, WALL, WORKER_CPU)),
        "fanout": Case("fanout", f"fan-out of {fanout_width} sub-tasks and back",
                       "fanout", fanout_width, (WALL, WORKER_CPU)),
    }


def _median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def run_case(case: Case, systems: Sequence[System], runs: int, warmup: int = 1,
             ours: str = "ours", meter: CpuMeter | None = None) -> dict[str, Any]:
    active = [s for s in systems if s.supports(case.workload)]
    for w in range(warmup):
        for s in active:
            sample = getattr(s, case.workload)(case.size)
            log(f"{case.name}: warm-up {w + 1}/{warmup} {s.key}: wall {sample.wall_s:.3f} s")
    samples: dict[str, list[Sample]] = {s.key: [] for s in active}
    for r in range(runs):
        order = active if r % 2 == 0 else list(reversed(active))
        for s in order:
            if meter is not None:
                meter.start()
            sample = getattr(s, case.workload)(case.size)
            if meter is not None:
                sample.detail.update(meter.stop())
            samples[s.key].append(sample)
            figs = ", ".join(f"{m.name} {_fmt(m.read(sample))} {m.unit}" for m in case.metrics)
            log(f"{case.name}: run {r + 1}/{runs} {s.key}: {figs}")

    metrics: dict[str, Any] = {}
    for m in case.metrics:
        med = {k: _median([m.read(x) for x in v]) for k, v in samples.items()}
        mine = med.get(ours)
        peers = {k: v for k, v in med.items() if k != ours}
        ratios = {k: (mine / v if mine is not None and v else None) for k, v in peers.items()}
        metrics[m.name] = {
            "unit": m.unit, "better": m.better, "target": m.target,
            "ours": mine, "peers": peers, "ratios": ratios,
            "meets_target": {k: m.meets(r) for k, r in ratios.items()},
            "samples": {k: [m.read(x) for x in v] for k, v in samples.items()},
        }
    detail = {k: {d: _median([x.detail.get(d) for x in v])
                  for d in sorted({d for x in v for d in x.detail})}
              for k, v in samples.items()}
    head = metrics[case.metrics[0].name]
    return {"name": case.name, "title": case.title, "size": case.size,
            "metric": case.metrics[0].name, "unit": head["unit"], "ours": head["ours"],
            "peers": head["peers"], "ratios": head["ratios"], "target": head["target"],
            "metrics": metrics, "detail_medians": detail, "runs": runs, "warmup": warmup}
