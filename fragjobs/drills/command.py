"""``python -m fragjobs.drills``: run the farm drills, print the table, exit 1 on a missed target.

Exit status: 0 every target met, 1 a target missed, 2 the farm could not be set up (a
missing binary, a service that did not start), 130 interrupted. Whatever was started is
stopped in every case.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fragjobs.drills.cluster import DrillFarm, DrillSettings
from fragjobs.drills.faults import DRILLS, DrillContext
from fragjobs.drills.report import TrialResult, summarise, table
from fragjobs.drills.services import ServiceError
from fragjobs.drills.tracking import recheck_completed_twice

EXIT_MISSED = 1
EXIT_SETUP = 2
EXIT_INTERRUPTED = 130


def parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    p = argparse.ArgumentParser(
        prog="python -m fragjobs.drills",
        description=(
            "Start a Redis, a PostgreSQL and moto's S3 server of our own on spare ports of "
            "127.0.0.1, two worker nodes (tiny-sd on CPU), and run the farm drills: "
            + ", ".join(DRILLS)
            + ". Prints jobs submitted / completed / lost / duplicated and recovery times; "
            "exits 1 when a target is missed."
        ),
    )
    p.add_argument("--trials", type=_positive_int, default=1, help="trials of each drill [1]")
    p.add_argument(
        "--drills",
        default=",".join(DRILLS),
        help="comma-separated drills to run, in this order [all]",
    )
    p.add_argument(
        "--outage-s", type=float, default=60.0, help="how long Redis/PostgreSQL stay down [60]"
    )
    p.add_argument(
        "--soft-time-limit",
        type=_positive_int,
        default=60,
        help="FRAGJOBS_TASK_SOFT_TIME_LIMIT of the workers [60]",
    )
    p.add_argument(
        "--time-limit",
        type=_positive_int,
        default=90,
        help="FRAGJOBS_TASK_TIME_LIMIT of the workers [90]; a killed worker's task is "
        "redelivered this + 60 s after it started",
    )
    p.add_argument("--steps", type=_positive_int, default=4, help="inference steps [4]")
    p.add_argument(
        "--redis-memory-only",
        action="store_true",
        help="run Redis without its append-only file (a restart then loses what was queued)",
    )
    p.add_argument("--pg-bindir", default=None, help="folder of initdb and pg_ctl [found]")
    p.add_argument("--workdir", type=Path, default=None, help="keep logs here [a temp folder]")
    p.add_argument("--json-out", type=Path, default=None, help="write the figures as JSON here")
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run the drills; return the exit status."""
    args = parser().parse_args(argv)
    chosen = [name.strip() for name in args.drills.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in DRILLS]
    if unknown or not chosen:
        print(f"error: unknown drill(s) {unknown}; known: {', '.join(DRILLS)}", file=sys.stderr)
        return EXIT_SETUP
    if args.time_limit <= args.soft_time_limit:
        print("error: --time-limit must be larger than --soft-time-limit", file=sys.stderr)
        return EXIT_SETUP
    if args.outage_s < 0:
        print("error: --outage-s must be >= 0", file=sys.stderr)
        return EXIT_SETUP
    settings = DrillSettings(
        soft_time_limit=args.soft_time_limit,
        time_limit=args.time_limit,
        steps=args.steps,
        redis_persistence=not args.redis_memory_only,
        pg_bindir=args.pg_bindir,
    )
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="fragjobs-drills-"))
    # Both stop the drill the same way, even where SIGINT was ignored (a background job).
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    trials: list[TrialResult] = []
    started = time.monotonic()
    status = EXIT_INTERRUPTED
    try:
        status = _run(folder, settings, chosen, args, trials)
    except KeyboardInterrupt:
        print("interrupted: everything started is stopped", file=sys.stderr)
    except (ServiceError, RuntimeError, OSError) as exc:
        print(f"error: the drill's farm could not be set up: {exc}", file=sys.stderr)
        status = EXIT_SETUP
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if args.json_out is not None:
            _write_json(args.json_out, settings, args, trials, started, status)
        if args.workdir is None:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    return status


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _run(
    folder: Path,
    settings: DrillSettings,
    chosen: list[str],
    args: argparse.Namespace,
    trials: list[TrialResult],
) -> int:
    _say(f"starting Redis, PostgreSQL, moto and two worker nodes under {folder}")
    with DrillFarm(folder, settings) as farm:
        _say(
            f"farm up; task time limits {settings.soft_time_limit}/{settings.time_limit} s, "
            f"a killed worker's task is redelivered after {farm.redelivery_s:.0f} s"
        )
        ctx = DrillContext(farm, args.outage_s)
        for name in chosen:
            for trial in range(1, args.trials + 1):
                _say(f"{name} #{trial} ...")
                began = time.monotonic()
                try:
                    result = DRILLS[name](ctx, trial)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # noqa: BLE001 (reported as a trial that did not run)
                    result = TrialResult(name, trial, error=f"{type(exc).__name__}: {exc}"[:400])
                trials.append(result)
                verdict = "; ".join(result.misses()) or "met"
                _say(f"{name} #{trial}: {verdict} ({time.monotonic() - began:.0f} s)")
        _, succeeded = farm.task_runs()
        for result in trials:
            found = [recheck_completed_twice(farm.farm, job, succeeded) for job in result.jobs]
            if any(found):
                result.count()
    print(table(trials))
    return EXIT_MISSED if any(t.misses() for t in trials) else 0


def _say(text: str) -> None:
    print(f"[drills {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _write_json(
    path: Path,
    settings: DrillSettings,
    args: argparse.Namespace,
    trials: list[TrialResult],
    started: float,
    status: int,
) -> None:
    document: dict[str, Any] = {
        "settings": {
            "trials": args.trials,
            "outage_s": args.outage_s,
            "soft_time_limit_s": settings.soft_time_limit,
            "time_limit_s": settings.time_limit,
            "steps": settings.steps,
            "model": settings.model,
            "redis_persistence": settings.redis_persistence,
        },
        "exit_status": status,
        "targets_met": status == 0,
        "duration_s": round(time.monotonic() - started, 1),
        "drills": summarise(trials),
        "trials": [t.to_json() for t in trials],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
