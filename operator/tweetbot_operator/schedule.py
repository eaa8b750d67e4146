"""spec.schedule's calendar: which tick is due and when the next one is (croniter reads the cron, zoneinfo the
time zone). Pure: the time is always given."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

_ANY_YEAR = datetime(2000, 1, 1, tzinfo=timezone.utc)  # a leap year's start: every date a cron can name follows


def check(schedule: dict) -> None:
    """ValueError saying what is wrong with a schedule the CRD's patterns let through."""
    cron = schedule.get("cron", "")
    if not isinstance(cron, str) or len(cron.split()) != 5 or not croniter.is_valid(cron):
        raise ValueError(f"spec.schedule.cron {cron!r} is not a cron schedule of five fields "
                         "(minute hour day-of-month month day-of-week)")
    try:
        croniter(cron, _ANY_YEAR).get_next(datetime)
    except CroniterBadDateError:  # e.g. "0 0 31 2 *": valid fields that name no date
        raise ValueError(f"spec.schedule.cron {cron!r} names no date that exists: it would never tick") from None
    _zone(schedule)


def _zone(schedule: dict) -> ZoneInfo:
    name = schedule.get("timeZone") or "UTC"
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"spec.schedule.timeZone {name!r} is not an IANA time zone (e.g. Europe/Paris)") from None


def latest_tick(schedule: dict, now: datetime) -> datetime:
    """The latest tick at or before `now` (UTC)."""
    start = now.astimezone(_zone(schedule)).replace(microsecond=0) + timedelta(seconds=1)
    return croniter(schedule["cron"], start).get_prev(datetime).astimezone(timezone.utc)


def next_tick(schedule: dict, now: datetime) -> datetime:
    """The first tick after `now` (UTC)."""
    return croniter(schedule["cron"], now.astimezone(_zone(schedule))).get_next(datetime).astimezone(timezone.utc)


def due_tick(schedule: dict, since: datetime, now: datetime) -> datetime | None:
    """The tick to start a run for now: the latest one after `since` (the last tick acted on, or the bot's
    creation), so ticks missed while the operator was down or a run went on start one run, not one each. None if
    there is none, or it is later than startingDeadlineSeconds."""
    tick = latest_tick(schedule, now)
    if tick <= since:
        return None
    deadline = schedule.get("startingDeadlineSeconds")
    if deadline is not None and (now - tick).total_seconds() > deadline:
        return None
    return tick
