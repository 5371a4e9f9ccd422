"""The result table (stdout) and ``bench/results/latest.json``."""

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
    return f"{v:.4g} {unit}".strip()


def table(entries: Sequence[dict[str, Any]], labels: dict[str, str]) -> str:
    peers: list[str] = []
    for e in entries:
        for k in e["peers"]:
            if k not in peers:
                peers.append(k)
    header = ["case", "metric", "ours"]
    for p in peers:
        header += [labels.get(p, p), f"ratio vs {labels.get(p, p)}"]
    header += ["target", "ok"]
    rows = [header]
    for e in entries:
        for name, m in e["metrics"].items():
            row = [e["title"], f"{name} ({m['unit']})", _num(m["ours"], m["unit"])]
            oks = []
            for p in peers:
                r = m["ratios"].get(p)
                row += [_num(m["peers"].get(p), m["unit"]), "-" if r is None else f"{r:.2f}x"]
                if m["meets_target"].get(p) is not None:
                    oks.append(m["meets_target"][p])
            sign = "<=" if m["better"] == "lower" else ">="
            row += ["-" if m["target"] is None else f"{sign} {m['target']}x",
                    "-" if not oks else ("yes" if all(oks) else "NO")]
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    out = [line(rows[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows[1:]]
    return "\n".join(out)


def write(doc: dict[str, Any], path: Path | None = None) -> Path:
    path = path or RESULTS / "latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(dumps(doc))
    os.replace(tmp, path)
    return path
