"""The result table (stdout), ``bench/results/latest.json`` and ``latest.md``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.env import dumps

RESULTS = Path(__file__).resolve().parent / "results"


def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "s":
        return f"{v:.3f} s"
    if unit == "ms":
        return f"{v:.2f} ms"
    if unit in ("debits", "workflows"):
        return f"{v:g}"
    if unit == "MB":
        return f"{v:.0f} MB"
    return f"{v:.4g} {unit}".strip()


def _peers(entries: Sequence[dict[str, Any]]) -> list[str]:
    peers: list[str] = []
    for e in entries:
        for m in e["metrics"].values():
            for k in m["peers"]:
                if k not in peers:
                    peers.append(k)
    return peers


def rows(entries: Sequence[dict[str, Any]], labels: dict[str, str],
         headline_only: bool = False) -> list[list[str]]:
    """Header and one row per (case, metric): value of each system, ours/peer ratios,
    the target and whether it is met."""
    peers = _peers(entries)
    header = ["case", "metric", labels.get("ours", "ours")]
    for p in peers:
        header += [labels.get(p, p), f"ours/{labels.get(p, p)}"]
    header += ["target", "met"]
    out = [header]
    for e in entries:
        for i, (name, m) in enumerate(e["metrics"].items()):
            if headline_only and i and m.get("expect") is None \
                    and not name.startswith("peak_"):
                continue
            sign = "higher" if m["better"] == "higher" else "lower"
            row = [e["title"] if i == 0 or headline_only else "",
                   f"{name} ({m['unit']}, {sign} is better)" if m.get("expect") is None
                   else f"{name} (must be {m['expect']:g})",
                   _num(m["ours"], m["unit"])]
            for p in peers:
                r = m["ratios"].get(p)
                row += [_num(m["peers"].get(p), m["unit"]),
                        "-" if r is None else f"{r:.2f}x"]
            if m.get("expect") is not None:
                target = f"= {m['expect']:g}"
            else:
                op = "<=" if m["better"] == "lower" else ">="
                target = ", ".join(f"{op} {t:g}x {labels.get(p, p)}"
                                   for p, t in m.get("targets", {}).items()) or "-"
            oks = [v for v in m["meets_target"].values() if v is not None]
            row += [target, "-" if not oks else ("yes" if all(oks) else "NO")]
            out.append(row)
    return out


def table(entries: Sequence[dict[str, Any]], labels: dict[str, str]) -> str:
    rs = rows(entries, labels)
    widths = [max(len(r[i]) for r in rs) for i in range(len(rs[0]))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    out = [line(rs[0]), "  ".join("-" * w for w in widths)]
    out += [line(r).rstrip() for r in rs[1:]]
    return "\n".join(out)


def markdown(doc: dict[str, Any], labels: dict[str, str]) -> str:
    """The README's section: date, machine, configuration, the table, the notes."""
    m = doc["machine"]
    pg = m["postgres"]
    load = doc["load_average"]
    other = (doc.get("cpu_during_bench") or {}).get("other_processes_share")
    lines = [
        f"`{doc['command']}` ({doc['warmup']} warm-up"
        f"{' at a tenth of the size' if doc.get('quick') else ''} + {doc['runs']} measured "
        f"runs per case and system, medians), {doc['date'][:10]}, {m['cores']} cores "
        f"({m['cpu']}), Python {m['python']}, PostgreSQL {pg['version']} "
        f"(synchronous_commit {pg['synchronous_commit']}, fsync {pg['fsync']}), "
        f"Redis {m['redis']['version']}, Celery {m['celery']}, DBOS {m.get('dbos', '?')}. "
        f"Load average {load['start'][0]:.2f} before the bench started"
        + (f"; during it, other processes used {other:.0%} of the CPU (the bench and "
           "its databases excluded)." if other is not None else "."),
        "",
    ]
    rs = rows(doc["cases"], labels, headline_only=True)
    lines.append("| " + " | ".join(rs[0]) + " |")
    lines.append("|" + "|".join("---" for _ in rs[0]) + "|")
    for r in rs[1:]:
        lines.append("| " + " | ".join(c or " " for c in r) + " |")
    lines.append("")
    for note in doc.get("config_notes", []):
        lines.append(f"- {note}")
    lines.append("")
    lines.append("Every metric (wall times, worker and PostgreSQL CPU, each run's figure) is "
                 "in `bench/results/latest.json`.")
    lines.append("")
    return "\n".join(lines)


def write(doc: dict[str, Any], path: Path | None = None) -> Path:
    path = path or RESULTS / "latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(dumps(doc))
    os.replace(tmp, path)
    return path


def write_text(text: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
