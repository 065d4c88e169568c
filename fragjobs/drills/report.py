"""The drill's figures: one :class:`TrialResult` per trial, the targets, a table and JSON.

Targets (issue 11): no job lost, none duplicated, every malformed spec refused before
anything is queued, and a whole-worker kill and a Redis or PostgreSQL outage recovered
without a person (every trial's jobs completed: a recovery time was measured). A problem
found on the way (store and catalog disagreeing, a row left ``running``, a trial that could
not run) misses the targets too.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

RECOVERY_REQUIRED = ("worker-kill", "redis-restart", "postgres-restart")
"""Drills whose every trial must recover without a person."""


@dataclass
class TrialResult:
    """One trial of one drill (counts are farm jobs: one ``Farm.submit`` each).

    ``refused``/``queued`` are set by the malformed drill only; ``recovery_s`` is None when
    the drill measures none or nothing recovered.
    """

    drill: str
    trial: int
    submitted: int = 0
    completed: int = 0
    lost: int = 0
    duplicated: int = 0
    recovery_s: float | None = None
    refused: int | None = None
    queued: int | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lost_reasons: list[str] = field(default_factory=list)
    duplicated_reasons: list[str] = field(default_factory=list)
    error: str | None = None
    jobs: list[Any] = field(default_factory=list, repr=False)

    def count(self) -> None:
        """Count the trial's jobs (after :func:`fragjobs.drills.tracking.check`)."""
        self.submitted = len(self.jobs)
        self.completed = sum(1 for job in self.jobs if job.completed and not job.duplicated)
        self.lost = sum(1 for job in self.jobs if job.lost)
        self.lost_reasons = [job.failure for job in self.jobs if job.lost]
        self.duplicated = max(self.duplicated, sum(1 for job in self.jobs if job.duplicated))
        self.duplicated_reasons = sorted(
            {*self.duplicated_reasons, *(r for job in self.jobs for r in job.duplicated)}
        )
        self.problems = sorted({*self.problems, *(p for job in self.jobs for p in job.problems)})

    def misses(self) -> list[str]:
        """The targets this trial missed, in words (empty: all met)."""
        out = []
        if self.error:
            out.append(f"did not run: {self.error}")
        if self.lost:
            out.append(f"{self.lost} lost")
        if self.duplicated:
            out.append(f"{self.duplicated} duplicated")
        if self.refused is not None and self.refused < self.submitted:
            out.append(f"{self.submitted - self.refused} malformed spec(s) accepted")
        if self.queued:
            out.append(f"{self.queued} malformed spec(s) reached the broker")
        if self.drill in RECOVERY_REQUIRED and self.recovery_s is None and not self.error:
            out.append("not recovered without a person")
        if self.problems:
            out.append(f"{len(self.problems)} problem(s)")
        return out

    def to_json(self) -> dict[str, Any]:
        """The trial as plain JSON (without the job handles)."""
        return {
            "drill": self.drill,
            "trial": self.trial,
            "submitted": self.submitted,
            "completed": self.completed,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "recovery_s": None if self.recovery_s is None else round(self.recovery_s, 1),
            "refused": self.refused,
            "queued": self.queued,
            "problems": self.problems,
            "notes": self.notes,
            "lost_reasons": self.lost_reasons,
            "duplicated_reasons": self.duplicated_reasons,
            "error": self.error,
            "missed": self.misses(),
        }


def summarise(trials: list[TrialResult]) -> list[dict[str, Any]]:
    """One row per drill (in the order first seen): sums, recovery median and max, misses."""
    order = list(dict.fromkeys(t.drill for t in trials))
    rows = []
    for drill in order:
        mine = [t for t in trials if t.drill == drill]
        recoveries = [t.recovery_s for t in mine if t.recovery_s is not None]
        misses = [f"trial {t.trial}: {m}" for t in mine for m in t.misses()]
        refused = [t.refused for t in mine if t.refused is not None]
        rows.append(
            {
                "drill": drill,
                "trials": len(mine),
                "submitted": sum(t.submitted for t in mine),
                "completed": sum(t.completed for t in mine),
                "refused": sum(refused) if refused else None,
                "lost": sum(t.lost for t in mine),
                "duplicated": sum(t.duplicated for t in mine),
                "recovery_median_s": (
                    round(statistics.median(recoveries), 1) if recoveries else None
                ),
                "recovery_max_s": round(max(recoveries), 1) if recoveries else None,
                "met": not misses,
                "missed": misses,
            }
        )
    return rows


def table(trials: list[TrialResult]) -> str:
    """The summary as aligned plain text, then each drill's notes and problems."""
    header = ("drill", "trials", "submitted", "completed", "lost", "dup", "recovery s", "target")
    lines = [header]
    for row in summarise(trials):
        recovery = "-"
        if row["recovery_max_s"] is not None:
            recovery = f"{row['recovery_median_s']:.1f}"
            if row["trials"] > 1:
                recovery += f" (max {row['recovery_max_s']:.1f})"
        completed = str(row["completed"])
        if row["refused"] is not None:
            completed = f"{row['refused']} refused"
        lines.append(
            (
                row["drill"],
                str(row["trials"]),
                str(row["submitted"]),
                completed,
                str(row["lost"]),
                str(row["duplicated"]),
                recovery,
                "met" if row["met"] else "MISSED",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    details = []
    for trial in trials:
        said = [*trial.notes, *(f"MISSED: {m}" for m in trial.misses())]
        said += [f"problem: {p}" for p in trial.problems]
        said += [f"lost: {r}" for r in trial.lost_reasons]
        said += [f"duplicated: {r}" for r in trial.duplicated_reasons]
        if trial.error:
            said.append(f"error: {trial.error}")
        if said:
            details.append(f"{trial.drill} #{trial.trial}: " + "; ".join(said))
    return "\n".join(text + ([""] + details if details else []))
