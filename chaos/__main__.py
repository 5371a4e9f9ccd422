"""``python -m chaos --seed 1 --workflows 2000 --faults 200``: see chaos/__init__.py."""

from __future__ import annotations

import argparse
import json
import sys
import time

from chaos.model import make_cases
from chaos.run import FAULTS, Report, Run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos", description=(
        "Run random workflows on our own PostgreSQL, Redis, workers, beat and (with "
        "Kafka) a Tansu broker, bridge, relay and agent; inject faults; check every "
        "workflow against the model. Exit 1 on any violation."))
    p.add_argument("--seed", type=int, default=1, help="Seed of the cases and the faults.")
    p.add_argument("--workflows", type=int, default=200, help="Workflows to run.")
    p.add_argument("--faults", type=int, default=20, help="Faults to inject.")
    p.add_argument("--no-kafka", action="store_true",
                   help="No Kafka: no agent steps, no bridge, relay or agent faults.")
    p.add_argument("--concurrency", type=int, default=60,
                   help="Workflows under way at once.")
    p.add_argument("--only", type=int, nargs="*", default=None, metavar="CASE",
                   help="Run only these cases of the seed (a reproduction).")
    p.add_argument("--kinds", default=None,
                   help=f"Fault kinds, comma-separated (default all: {', '.join(FAULTS)}).")
    p.add_argument("--timeout", type=float, default=None,
                   help="Seconds for the whole run (default 300 + 0.6 a workflow).")
    p.add_argument("--show", type=int, default=None, metavar="CASE",
                   help="Print a case's plan and model, and exit.")
    args = p.parse_args(argv)
    if args.workflows < 1 or args.faults < 0 or args.concurrency < 1:
        p.error("--workflows and --concurrency must be at least 1, --faults at least 0")
    kinds = tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else None
    if kinds and set(kinds) - set(FAULTS):
        p.error(f"unknown fault kind(s): {', '.join(sorted(set(kinds) - set(FAULTS)))}")
    if args.show is not None:
        case = make_cases(args.seed, max(args.workflows, args.show + 1),
                          not args.no_kafka)[args.show]
        print(json.dumps({"plan": case.plan, "input": case.input, "answer": case.answer,
                          "expect": case.expect.__dict__}, indent=2))
        return 0
    print(f"chaos: seed {args.seed}, {args.workflows} workflows, {args.faults} faults, "
          f"Kafka {'off' if args.no_kafka else 'on'}", flush=True)
    run = Run(args.seed, args.workflows, args.faults, kafka=not args.no_kafka,
              concurrency=args.concurrency, only=args.only, timeout=args.timeout,
              kinds=kinds, log=lambda line: print(line, flush=True))
    import signal

    def stop(signum: int, _frame: object) -> None:  # SIGTERM: leave through the clean-up
        raise SystemExit(f"chaos: signal {signum}, stopping its processes")

    signal.signal(signal.SIGTERM, stop)
    report = run.run()
    print_report(report, args)
    return 0 if report.ok else 1


def print_report(r: Report, args: argparse.Namespace) -> None:
    rows = [("workflows", str(r.workflows)),
            ("final statuses", ", ".join(f"{k} {v}" for k, v in sorted(r.statuses.items()))),
            ("faults injected", f"{sum(r.faults.values())}: " + ", ".join(
                f"{k} {v}" for k, v in sorted(r.faults.items()) if v)),
            ("attempts failed by a revoke", str(r.revoked)),
            ("exited by themselves", ", ".join(f"{k} {v}" for k, v in
                                               sorted(r.crashed.items())) or "none"),
            ("lost", str(len(r.violations.get("lost", [])))),
            ("duplicated records", str(len(r.violations.get("duplicated", [])))),
            ("wrong records", str(len(r.violations.get("wrong_records", [])))),
            ("wrong status", str(len(r.violations.get("wrong_status", [])))),
            ("compensation", str(len(r.violations.get("compensation", [])))),
            ("fuel", str(len(r.violations.get("fuel", [])))),
            ("outbox", str(len(r.violations.get("outbox", [])))),
            ("stuck (not final)", str(len(r.stuck) + len(r.violations.get("stuck_steps", [])))),
            ("settled after the last fault", f"{r.settle_seconds:.1f} s"),
            ("run time", f"{r.seconds:.0f} s")]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v}")
    if r.ok:
        print("\nno violation")
        return
    print("\nVIOLATIONS")
    for kind, lines in r.violations.items():
        print(f"- {kind}: {len(lines)}")
        for line in lines[:5]:
            print(f"    {line}")
    if r.stuck:
        print(f"- stuck: cases {r.stuck[:20]}")
    cases = sorted(set(r.first.values()) | set(r.stuck[:1]))
    print(f"\nseed {r.seed}; reproduce with:\n  python -m chaos --seed {args.seed} "
          f"--workflows {args.workflows} --faults {args.faults} --only "
          f"{' '.join(map(str, cases))}"
          + (" --no-kafka" if args.no_kafka else "")
          + f"\n  python -m chaos --seed {args.seed} --workflows {args.workflows} --show "
          f"{cases[0] if cases else 0}")


if __name__ == "__main__":
    started = time.monotonic()
    sys.exit(main())
