"""Which backups prune keeps: counts of newest, daily, weekly and monthly backups.

Each kind of rule keeps the newest backup of each of the N most recent periods (UTC days, ISO
weeks, months) that have a backup, like the rotation schemes of common backup tools; `keep_last`
keeps the N newest backups whatever their age. Periods are counted from the backups that exist,
not from today, so backups that are merely old are never all deleted (the seed's 30-day `find
-delete` removed everything once backups stopped). Two backups are always kept: the newest one
and the newest verified one. A backup whose verification failed never stands for its period.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Candidate:
    """What retention needs to know about one backup."""

    id: str
    created: datetime
    verified: bool = False
    verify_failed: bool = False


@dataclass(frozen=True)
class Policy:
    """The counts of backup.keep_*."""

    last: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0


PERIODS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar())[:2],
    "monthly": lambda t: (t.year, t.month),
}


def period_name(kind: str, when: datetime) -> str:
    """How a kept period is shown: 2025-01-31, 2025-W05, 2025-01."""
    if kind == "daily":
        return when.strftime("%Y-%m-%d")
    if kind == "weekly":
        year, week, _ = when.isocalendar()
        return f"{year}-W{week:02d}"
    return when.strftime("%Y-%m")


def decide(backups: Sequence[Candidate], policy: Policy) -> dict[str, list[str]]:
    """For every backup id, the reasons to keep it (an empty list: prune deletes it)."""
    newest_first = sorted(backups, key=lambda b: (b.created, b.id), reverse=True)
    reasons: dict[str, list[str]] = {b.id: [] for b in newest_first}
    if not newest_first:
        return reasons
    reasons[newest_first[0].id].append("newest")
    verified = [b for b in newest_first if b.verified]
    if verified:
        reasons[verified[0].id].append("newest verified")
    usable = [b for b in newest_first if not b.verify_failed]
    for index, backup in enumerate(usable[:policy.last]):
        reasons[backup.id].append(f"last {index + 1}")
    for kind, key in PERIODS.items():
        count = getattr(policy, kind)
        seen: set[tuple[int, ...]] = set()
        for backup in usable:
            if len(seen) >= count:
                break
            period = key(backup.created)
            if period in seen:
                continue
            seen.add(period)
            reasons[backup.id].append(f"{kind} {period_name(kind, backup.created)}")
    return reasons


def to_delete(backups: Sequence[Candidate], policy: Policy) -> list[str]:
    """The ids prune deletes, oldest first."""
    reasons = decide(backups, policy)
    ordered = sorted(backups, key=lambda b: (b.created, b.id))
    return [b.id for b in ordered if not reasons[b.id]]
