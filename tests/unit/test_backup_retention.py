"""Retention arithmetic of backup.prune on synthetic backups: what is kept, and why."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tasks.backups.retention import Candidate, Policy, decide, period_name, to_delete

START = datetime(2025, 1, 1, 3, 0, tzinfo=UTC)  # a Wednesday; ISO week 2025-W01


def at(when: datetime, **flags: bool) -> Candidate:
    return Candidate(when.strftime("%Y%m%dT%H%M%SZ"), when, **flags)


def nightly(days: int, start: datetime = START, **flags: bool) -> list[Candidate]:
    """One backup a night for `days` nights from start."""
    return [at(start + timedelta(days=n), **flags) for n in range(days)]


def kept(backups: list[Candidate], policy: Policy) -> list[str]:
    deleted = set(to_delete(backups, policy))
    return [b.id for b in sorted(backups, key=lambda b: b.created) if b.id not in deleted]


def test_no_backups_nothing_to_do() -> None:
    assert decide([], Policy(daily=7)) == {}
    assert to_delete([], Policy(daily=7)) == []


def test_daily_keeps_the_newest_of_each_of_the_last_n_days() -> None:
    backups = nightly(10)
    assert kept(backups, Policy(daily=7)) == [b.id for b in backups[3:]]


def test_several_backups_a_day_count_as_one_day() -> None:
    backups = [at(START + timedelta(days=d, hours=h)) for d in range(3) for h in (0, 6, 12)]
    result = kept(backups, Policy(daily=2))
    # the newest of each of the two newest days (day 2 at 15:00, day 1 at 15:00)
    assert result == [backups[5].id, backups[8].id]


def test_days_are_counted_among_days_that_have_backups_not_from_today() -> None:
    """Backups that stopped a year ago are not all deleted (the seed's 30-day find -delete)."""
    backups = nightly(10, start=START - timedelta(days=400))
    assert kept(backups, Policy(daily=7)) == [b.id for b in backups[3:]]


def test_gaps_between_days_do_not_use_up_the_count() -> None:
    backups = [at(START + timedelta(days=d)) for d in (0, 5, 9, 20)]
    assert kept(backups, Policy(daily=3)) == [b.id for b in backups[1:]]


def test_weekly_uses_iso_weeks() -> None:
    # Sun 2025-01-05 is in week 1, Mon 2025-01-06 starts week 2.
    sunday, monday = at(datetime(2025, 1, 5, 3, tzinfo=UTC)), at(datetime(2025, 1, 6, 3,
                                                                          tzinfo=UTC))
    saturday = at(datetime(2025, 1, 4, 3, tzinfo=UTC))
    reasons = decide([saturday, sunday, monday], Policy(weekly=2))
    assert reasons[monday.id] == ["newest", "weekly 2025-W02"]
    assert reasons[sunday.id] == ["weekly 2025-W01"]
    assert reasons[saturday.id] == []


def test_iso_week_across_new_year() -> None:
    # Mon 2024-12-30 belongs to ISO week 2025-W01, like Wed 2025-01-01.
    december, january = at(datetime(2024, 12, 30, tzinfo=UTC)), at(START)
    reasons = decide([december, january], Policy(weekly=2))
    assert reasons[january.id] == ["newest", "weekly 2025-W01"]
    assert reasons[december.id] == []  # same ISO week: only the newest stands for it
    assert period_name("weekly", december.created) == "2025-W01"


def test_monthly_keeps_the_newest_of_each_month() -> None:
    backups = nightly(100)  # January to early April
    reasons = decide(backups, Policy(monthly=3))
    monthly = {b.id: r for b, r in ((b, reasons[b.id]) for b in backups) if r}
    # the three most recent months that have backups: April (so far), March, February
    assert monthly == {
        "20250228T030000Z": ["monthly 2025-02"],
        "20250331T030000Z": ["monthly 2025-03"],
        "20250410T030000Z": ["newest", "monthly 2025-04"],
    }


def test_grandfather_father_son_over_a_year() -> None:
    backups = nightly(365)
    policy = Policy(last=2, daily=7, weekly=4, monthly=6)
    reasons = decide(backups, policy)
    survivors = [b for b in backups if reasons[b.id]]
    newest = backups[-1].created
    # 7 daily, up to 4 weekly and 6 monthly, overlapping at the newest end
    assert len([b for b in survivors if any(r.startswith("daily") for r in reasons[b.id])]) == 7
    assert len([b for b in survivors if any(r.startswith("weekly") for r in reasons[b.id])]) == 4
    assert len([b for b in survivors if any(r.startswith("monthly") for r in reasons[b.id])]) == 6
    assert len(survivors) <= 2 + 7 + 4 + 6
    assert min(b.created for b in survivors) >= newest - timedelta(days=6 * 31)
    assert backups[-1].id in [b.id for b in survivors]
    assert reasons[backups[-1].id][:3] == ["newest", "last 1", "daily 2025-12-31"]


def test_keep_last_counts_backups_whatever_their_day() -> None:
    backups = [at(START + timedelta(minutes=m)) for m in range(5)]
    assert kept(backups, Policy(last=3)) == [b.id for b in backups[2:]]


def test_all_zero_still_keeps_the_newest() -> None:
    backups = nightly(5)
    assert kept(backups, Policy()) == [backups[-1].id]


def test_the_newest_verified_backup_is_never_deleted() -> None:
    old_verified = at(START, verified=True)
    newer = nightly(5, start=START + timedelta(days=1))
    reasons = decide([old_verified, *newer], Policy(daily=2))
    assert reasons[old_verified.id] == ["newest verified"]
    assert to_delete([old_verified, *newer], Policy(daily=2)) == [b.id for b in newer[:3]]


def test_only_the_newest_verified_is_protected() -> None:
    verified = nightly(3, verified=True)
    result = to_delete(verified, Policy())
    assert result == [verified[0].id, verified[1].id]


def test_failed_verification_never_stands_for_a_period() -> None:
    good = at(START)
    bad_same_day = at(START + timedelta(hours=6), verify_failed=True)
    newest_good = at(START + timedelta(days=1))
    reasons = decide([good, bad_same_day, newest_good], Policy(last=2, daily=2))
    assert reasons[bad_same_day.id] == []
    assert reasons[good.id] == ["last 2", "daily 2025-01-01"]
    assert reasons[newest_good.id] == ["newest", "last 1", "daily 2025-01-02"]


def test_a_newest_backup_that_failed_verification_is_kept_but_does_not_count() -> None:
    backups = [*nightly(3, verified=True), at(START + timedelta(days=3), verify_failed=True)]
    reasons = decide(backups, Policy(daily=1))
    assert reasons[backups[-1].id] == ["newest"]          # kept: never delete everything
    assert reasons[backups[2].id] == ["newest verified", "daily 2025-01-03"]
    assert to_delete(backups, Policy(daily=1)) == [backups[0].id, backups[1].id]


def test_all_failed_verification_keeps_only_the_newest() -> None:
    backups = nightly(4, verify_failed=True)
    assert kept(backups, Policy(last=3, daily=7)) == [backups[-1].id]


def test_order_of_input_does_not_matter() -> None:
    backups = nightly(30)
    policy = Policy(last=1, daily=3, weekly=2, monthly=1)
    assert to_delete(list(reversed(backups)), policy) == to_delete(backups, policy)


def test_same_second_ids_are_ordered_by_suffix() -> None:
    first = Candidate("20250101T030000Z", START)
    second = Candidate("20250101T030000Z-1", START)
    assert decide([second, first], Policy())[second.id] == ["newest"]


@pytest.mark.parametrize(("kind", "expected"), [("daily", "2025-01-01"), ("weekly", "2025-W01"),
                                                 ("monthly", "2025-01")])
def test_period_names(kind: str, expected: str) -> None:
    assert period_name(kind, START) == expected


def test_deletions_are_listed_oldest_first_and_never_include_kept() -> None:
    backups = nightly(20)
    policy = Policy(daily=5, weekly=2)
    deleted = to_delete(backups, policy)
    reasons = decide(backups, policy)
    assert deleted == sorted(deleted)
    assert all(not reasons[i] for i in deleted)
    assert len(deleted) + sum(1 for r in reasons.values() if r) == len(backups)
