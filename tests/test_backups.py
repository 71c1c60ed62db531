"""Backup names and retention (natalia_secure/backups.py): the name form, and borg/restic-style pruning."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natalia_secure import backups
from natalia_secure.backups import BackupInfo, Retention

MS_2026_11_25_101530 = int(datetime(2026, 11, 25, 10, 15, 30, tzinfo=UTC).timestamp() * 1000)


def info(t: datetime, generation: int = 1) -> BackupInfo:
    name = backups.backup_name(int(t.timestamp() * 1000), generation)
    parsed = backups.parse_name(name)
    assert parsed is not None
    return parsed


def test_backup_name_design_form() -> None:
    """A backup is named as DESIGN.md shows: sessions.20261125T101530Z.g000123.enc."""
    assert backups.backup_name(MS_2026_11_25_101530, 123) == "sessions.20261125T101530Z.g000123.enc"
    assert backups.backup_name(MS_2026_11_25_101530 + 999, 123) == "sessions.20261125T101530Z.g000123.enc"
    assert backups.backup_name(MS_2026_11_25_101530, 1_234_567) == "sessions.20261125T101530Z.g1234567.enc"


def test_parse_name_design_form() -> None:
    """The DESIGN.md example parses to its UTC time and generation."""
    assert backups.parse_name("sessions.20261125T101530Z.g000123.enc") == BackupInfo(
        datetime(2026, 11, 25, 10, 15, 30, tzinfo=UTC), 123, "sessions.20261125T101530Z.g000123.enc"
    )


@settings(max_examples=200, deadline=None)
@given(ms=st.integers(0, 253_402_300_799_999), generation=st.integers(0, 10**9))
def test_name_round_trip(ms: int, generation: int) -> None:
    """backup_name then parse_name gives back the time (to the second, UTC) and the generation, for any time up to 9999."""
    parsed = backups.parse_name(backups.backup_name(ms, generation))
    assert parsed is not None
    assert parsed.time == datetime.fromtimestamp(ms // 1000, UTC)
    assert parsed.generation == generation


@pytest.mark.parametrize(
    "name",
    [
        "sessions.20261125T101530Z.g00123.enc",  # five digits
        "sessions.20261125T101530Z.g000123.enc.tmp",
        ".sessions.20261125T101530Z.g000123.enc.0123456789ab.tmp",
        "sessions.20261125T101530.g000123.enc",
        "sessions.2026-11-25T10:15:30Z.g000123.enc",
        "snapshot.g000123.enc",
        "xsessions.20261125T101530Z.g000123.enc",
        "sessions.20261125T101530Z.g000123.enc\n",
        "sessions.20261125T101530Z.g-00123.enc",
    ],
)
def test_parse_name_ignores_other_names(name: str) -> None:
    """Names that are not exactly a backup's (temps, snapshots, near misses) parse to None."""
    assert backups.parse_name(name) is None


@pytest.mark.parametrize("name", ["sessions.20261345T101530Z.g000001.enc", "sessions.20260230T256161Z.g000001.enc"])
def test_parse_name_ignores_impossible_dates(name: str) -> None:
    """A name of the right shape but an impossible date is ignored like any other stray name, not a crash."""
    assert backups.parse_name(name) is None


def test_scan(tmp_path: Path) -> None:
    """scan lists only backups, oldest first, and a missing directory holds none."""
    names = [
        "sessions.20261125T101530Z.g000123.enc",
        "sessions.20250101T000000Z.g000001.enc",
        "sessions.20261125T101530Z.g000122.enc",
    ]
    for n in [*names, "notes.txt", ".sessions.20261125T101530Z.g000124.enc.0123456789ab.tmp"]:
        (tmp_path / n).write_bytes(b"")
    assert [b.name for b in backups.scan(str(tmp_path))] == [names[1], names[2], names[0]]
    assert backups.scan(str(tmp_path / "absent")) == []


def test_empty_plan() -> None:
    """Pruning no backups keeps and removes nothing."""
    result = backups.plan_prune([], Retention())
    assert result.keep == {}
    assert result.remove == []


def test_newest_is_always_kept() -> None:
    """With every rule at zero, the newest backup is still kept (and only it)."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    items = [info(t0 + timedelta(hours=i), i) for i in range(5)]
    result = backups.plan_prune(items, Retention(0, 0, 0, 0, 0))
    assert result.keep == {items[-1].name: ["newest"]}
    assert result.remove == list(reversed(items[:-1]))


def test_protected_backup_is_kept() -> None:
    """`protect` keeps the named backup (the newest that authenticates) even when every rule would remove it."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    items = [info(t0 + timedelta(hours=i), i) for i in range(5)]
    result = backups.plan_prune(items, Retention(1, 0, 0, 0, 0), protect=items[1].name)
    assert result.keep == {items[4].name: ["last #1", "newest"], items[1].name: ["newest good"]}
    assert result.remove == [items[3], items[2], items[0]]


def test_protect_adds_to_other_reasons() -> None:
    """A protected backup that a rule keeps anyway is kept once, with both reasons."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    items = [info(t0 + timedelta(hours=i), i) for i in range(3)]
    result = backups.plan_prune(items, Retention(0, 0, 0, 0, 0), protect=items[2].name)
    assert result.keep == {items[2].name: ["newest", "newest good"]}


def test_protect_of_an_unknown_name_is_ignored() -> None:
    """Protecting a name that is not among the backups changes nothing (it is not invented into the keep list)."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    items = [info(t0 + timedelta(hours=i), i) for i in range(3)]
    plain = backups.plan_prune(items, Retention(1, 0, 0, 0, 0))
    assert backups.plan_prune(items, Retention(1, 0, 0, 0, 0), protect="sessions.20000101T000000Z.g000001.enc") == plain


def test_keep_last() -> None:
    """keep-last keeps the N newest, whatever their spacing, numbered from the newest."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    items = [info(t0 + timedelta(seconds=i), i) for i in range(10)]
    result = backups.plan_prune(items, Retention(3, 0, 0, 0, 0))
    assert result.keep == {
        items[9].name: ["last #1", "newest"],
        items[8].name: ["last #2"],
        items[7].name: ["last #3"],
    }
    assert len(result.remove) == 7


def test_hourly_takes_the_newest_of_each_hour() -> None:
    """keep-hourly keeps the newest backup of each of the N newest hours that have one."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    items = [info(t0 + timedelta(minutes=20 * i), i) for i in range(9)]  # three per hour, hours 0-2
    result = backups.plan_prune(items, Retention(0, 2, 0, 0, 0))
    assert result.keep == {items[8].name: ["hourly #1", "newest"], items[5].name: ["hourly #2"]}


def test_rule_running_out_keeps_the_oldest() -> None:
    """A rule that finds fewer periods than it wants also keeps the oldest backup (borg 1.2's rule)."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    items = [info(t0 + timedelta(minutes=20 * i), i) for i in range(9)]
    result = backups.plan_prune(items, Retention(0, 5, 0, 0, 0))
    assert result.keep[items[0].name] == ["hourly (oldest)"]
    assert set(result.keep) == {items[8].name, items[5].name, items[2].name, items[0].name}


def test_earlier_rules_do_not_count_for_later_ones() -> None:
    """A backup kept by keep-last does not count towards keep-daily, which then reaches further back (borg's prune_split)."""
    t0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
    items = [info(t0 + timedelta(days=i), i) for i in range(6)]  # one a day
    result = backups.plan_prune(items, Retention(2, 0, 2, 0, 0))
    assert result.keep == {
        items[5].name: ["last #1", "newest"],
        items[4].name: ["last #2"],
        items[3].name: ["daily #1"],
        items[2].name: ["daily #2"],
    }


def test_rule_keeping_nothing_new_still_keeps_the_oldest() -> None:
    """As in borg 1.2's prune_split, a rule short of its target keeps the oldest backup even when it kept no other."""
    t0 = datetime(2026, 1, 1, 10, tzinfo=UTC)
    items = [info(t0 + timedelta(minutes=m), m) for m in (0, 10, 20)]  # all in one hour and one day
    result = backups.plan_prune(items, Retention(1, 0, 7, 0, 0))
    # last keeps 10:20; daily's only period starts at 10:20 (already kept), so it keeps nothing new: short of 7.
    assert items[0].name in result.keep


def test_hand_computed_90_days_of_hourly_backups() -> None:
    """90 days of hourly backups under the default Retention(10, 24, 7, 4, 6) keep exactly the 49 worked out by hand."""
    newest = datetime(2026, 11, 25, 10, tzinfo=UTC)  # a Wednesday, ISO week 48
    items = [info(newest - timedelta(hours=h), 10_000 - h) for h in range(90 * 24)]
    assert items[-1].time == datetime(2026, 8, 27, 11, tzinfo=UTC)
    result = backups.plan_prune(items, Retention())
    assert Retention() == Retention(last=10, hourly=24, daily=7, weekly=4, monthly=6)

    def at(month: int, day: int, hour: int) -> str:
        return backups.backup_name(int(datetime(2026, month, day, hour, tzinfo=UTC).timestamp() * 1000), 0)[:-11]

    expected: dict[str, list[str]] = {}
    # last 10: Nov 25 10:00 back to 01:00.
    for i, hour in enumerate(range(10, 0, -1)):
        expected[at(11, 25, hour)] = [f"last #{i + 1}"]
    expected[at(11, 25, 10)].append("newest")
    # hourly 24: every backup is alone in its hour; the 10 already kept do not count: Nov 25 00:00, then Nov 24 23:00-01:00.
    expected[at(11, 25, 0)] = ["hourly #1"]
    for i, hour in enumerate(range(23, 0, -1)):
        expected[at(11, 24, hour)] = [f"hourly #{i + 2}"]
    # daily 7: Nov 25 and Nov 24 are spent on backups kept already; then the 23:00 of Nov 23 back to Nov 17.
    for i, day in enumerate(range(23, 16, -1)):
        expected[at(11, day, 23)] = [f"daily #{i + 1}"]
    # weekly 4 (ISO weeks, Monday-Sunday): W48 and W47 (Nov 16-22) are spent; then Sundays Nov 15, 8, 1 and Oct 25.
    for i, (month, day) in enumerate([(11, 15), (11, 8), (11, 1), (10, 25)]):
        expected[at(month, day, 23)] = [f"weekly #{i + 1}"]
    # monthly 6: November is spent; Oct 31, Sep 30, Aug 31 at 23:00; then the rule runs out and keeps the oldest.
    for i, (month, day) in enumerate([(10, 31), (9, 30), (8, 31)]):
        expected[at(month, day, 23)] = [f"monthly #{i + 1}"]
    expected[at(8, 27, 11)] = ["monthly (oldest)"]

    got = {name[:-11]: reasons for name, reasons in result.keep.items()}  # drop ".gNNNNNN.enc" (generation varies)
    assert got == expected
    assert len(result.keep) == 49
    assert len(result.remove) == 90 * 24 - 49


@st.composite
def backup_sets(draw: st.DrawFn) -> list[BackupInfo]:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    offsets = draw(st.lists(st.integers(0, 3 * 365 * 86400), min_size=0, max_size=60, unique=True))
    spread = draw(st.sampled_from([60, 3600, 86400]))  # cluster within minutes, hours or days sometimes
    scaled = sorted({o % (spread * 500) if draw(st.booleans()) else o for o in offsets})
    return [info(start + timedelta(seconds=s), g) for g, s in enumerate(scaled)]


retentions = st.builds(Retention, *(st.integers(0, 12) for _ in range(5)))


@settings(max_examples=300, deadline=None)
@given(items=backup_sets(), policy=retentions, protect_index=st.none() | st.integers(0, 100))
def test_plan_prune_partitions_and_keeps_newest(items: list[BackupInfo], policy: Retention, protect_index: int | None) -> None:
    """For any backups, policy and protected one, kept and removed partition the input, the newest and the protected are kept."""
    protect = items[protect_index % len(items)].name if items and protect_index is not None else None
    result = backups.plan_prune(items, policy, protect=protect)
    if protect is not None:
        assert "newest good" in result.keep[protect]
    names = {b.name for b in items}
    removed = {b.name for b in result.remove}
    assert set(result.keep) | removed == names
    assert not set(result.keep) & removed
    assert len(result.remove) == len(removed)
    if items:
        assert max(items).name in result.keep
        assert "newest" in result.keep[max(items).name]
    assert result.remove == sorted(result.remove, reverse=True)  # newest first
    counts: dict[str, int] = {}
    for reasons in result.keep.values():
        for r in reasons:
            rule = r if r.startswith("newest") else r.split(" ")[0]
            counts[rule] = counts.get(rule, 0) + 1
    for rule in ("last", "hourly", "daily", "weekly", "monthly"):
        assert counts.get(rule, 0) <= getattr(policy, rule)
    assert counts.get("newest", 0) == (1 if items else 0)
    assert counts.get("newest good", 0) == (1 if protect else 0)
    assert len(result.keep) <= 2 + policy.last + policy.hourly + policy.daily + policy.weekly + policy.monthly


@settings(max_examples=100, deadline=None)
@given(items=backup_sets(), policy=retentions)
def test_plan_prune_is_stable(items: list[BackupInfo], policy: Retention) -> None:
    """The input's order does not matter, and pruning again what a prune kept removes nothing (a rerun is harmless)."""
    first = backups.plan_prune(items, policy)
    assert backups.plan_prune(list(reversed(items)), policy).keep == first.keep
    second = backups.plan_prune([b for b in items if b.name in first.keep], policy)
    assert second.remove == []
    assert second.keep == first.keep


def test_scan_then_prune_in_a_directory(tmp_path: Path) -> None:
    """Names written by backup_name, listed by scan, feed plan_prune directly (the store's prune path)."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(30):
        (tmp_path / backups.backup_name(int((t0 + timedelta(hours=i)).timestamp() * 1000), i)).write_bytes(b"")
    result = backups.plan_prune(backups.scan(str(tmp_path)), Retention(5, 0, 0, 0, 0))
    assert len(result.keep) == 5
    assert len(result.remove) == 25
    assert all(os.path.exists(tmp_path / b.name) for b in result.remove)


def borg_prune(items: list[BackupInfo], policy: Retention) -> set[str]:
    """borg 1.2's prune_split (src/borg/archiver/prune_cmd.py) in UTC, with keep-last as the N newest: the reference."""
    newest_first = sorted(items, reverse=True)
    kept = {b.name for b in newest_first[: policy.last]}
    periods = {
        "hourly": lambda t: (t.year, t.month, t.day, t.hour),
        "daily": lambda t: (t.year, t.month, t.day),
        "weekly": lambda t: t.isocalendar()[:2],
        "monthly": lambda t: (t.year, t.month),
    }
    for rule, period in periods.items():
        n = getattr(policy, rule)
        if n == 0:
            continue
        keep, last, a = 0, None, None
        for a in newest_first:
            p = period(a.time)
            if p != last:
                last = p
                if a.name not in kept:
                    kept.add(a.name)
                    keep += 1
                    if keep == n:
                        break
        if a is not None and keep < n and a.name not in kept:  # "keep oldest archive if we didn't reach the target"
            kept.add(a.name)
    if newest_first:
        kept.add(newest_first[0].name)
    return kept


@settings(max_examples=200, deadline=None)
@given(items=backup_sets(), policy=retentions)
def test_plan_prune_matches_borg(items: list[BackupInfo], policy: Retention) -> None:
    """plan_prune keeps exactly what borg's prune_split would keep (UTC periods, keep-last = the N newest)."""
    assert set(backups.plan_prune(items, policy).keep) == borg_prune(items, policy)

