"""spec.schedule without a cluster: the calendar, and what the plan does on each tick."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from test_reconcile import ALL_SECRETS, condition, job, make_bot, result, settle
from tweetbot_operator.plan import Observed
from tweetbot_operator.schedule import due_tick, latest_tick, next_tick
from tweetbot_operator.settings import Settings
from tweetbot_operator.spec import InvalidSpec, run_id_for, validate_spec
from tweetbot_trainer.contract import STAGES

UTC = timezone.utc
DAILY = {"cron": "0 4 * * *", "suspend": False, "minNewPosts": 1, "resumeFrom": "base"}
CREATED = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=UTC)


# --- the calendar -----------------------------------------------------------------------------------

def test_ticks_follow_the_cron_in_its_time_zone():
    paris = {**DAILY, "timeZone": "Europe/Paris"}  # UTC+1 in November
    assert latest_tick(DAILY, at(23, 4)) == at(23, 4)  # a tick at `now` is due now
    assert latest_tick(paris, at(23, 4)) == at(23, 3)
    assert next_tick(DAILY, at(23, 4)) == at(24, 4) and next_tick(paris, at(23, 4)) == at(24, 3)
    # Paris leaves summer time on 25 October 2026: 04:00 there is 02:00 UTC before, 03:00 UTC after.
    assert next_tick(paris, datetime(2026, 10, 24, 12, tzinfo=UTC)) == datetime(2026, 10, 25, 3, tzinfo=UTC)
    assert next_tick(paris, datetime(2026, 10, 23, 12, tzinfo=UTC)) == datetime(2026, 10, 24, 2, tzinfo=UTC)


def test_missed_ticks_start_one_run_and_a_deadline_skips_a_late_one():
    assert due_tick(DAILY, since=at(22, 10), now=at(23, 3, 59)) is None
    assert due_tick(DAILY, since=at(22, 10), now=at(23, 4, 1)) == at(23, 4)
    assert due_tick(DAILY, since=at(23, 4), now=at(23, 12)) is None  # already acted on
    assert due_tick(DAILY, since=at(23, 4), now=at(27, 5)) == at(27, 4)  # four missed: only the latest
    late = {**DAILY, "startingDeadlineSeconds": 600}
    assert due_tick(late, since=at(23, 4), now=at(27, 4, 10)) == at(27, 4)
    assert due_tick(late, since=at(23, 4), now=at(27, 4, 11)) is None


@pytest.mark.parametrize("schedule, message", [
    ({"cron": "61 * * * *"}, "not a cron schedule"),
    ({"cron": "0 4 * * * 2026"}, "not a cron schedule of five fields"),
    ({"cron": "0 0 31 2 *"}, "names no date that exists"),  # croniter accepts it, then fails at every tick
    ({"cron": "0 4 * * *", "timeZone": "Mars/Olympus_Mons"}, "not an IANA time zone"),
])
def test_the_operator_refuses_a_schedule_the_schema_lets_through(schedule, message):
    with pytest.raises(InvalidSpec, match=message):
        validate_spec(scheduled(**schedule), Settings(trainer_image="t"))


# --- ticks -> runs ----------------------------------------------------------------------------------

def scheduled(**schedule) -> dict:
    bot = make_bot(schedule={**DAILY, **schedule})
    bot["metadata"]["creationTimestamp"] = "2026-11-22T10:00:00Z"
    return bot


def finish_run(bot, now, new_posts=None, train=True):
    """Run the bot's current run to its end at `now`: scrape (with its post counts), then train and publish."""
    jobs, results = [], {}
    scrape = job(bot, "scrape", "Succeeded")
    jobs.append(scrape)
    results[scrape["metadata"]["name"]] = result(bot, "scrape", metrics={"posts": 120, "newPosts": 120 if new_posts is None else new_posts})
    if train:
        for stage, fields in (("train", {"metrics": {"evalLoss": 2.5}}), ("publish", {"artifacts": {"hubCommit": f"c-{bot['status']['runId']}"}})):
            done = job(bot, stage, "Succeeded")
            jobs.append(done)
            results[done["metadata"]["name"]] = result(bot, stage, **fields)
    decided = settle(bot, Observed(jobs=jobs, results=results, secrets=ALL_SECRETS), now=now)
    bot = {**bot, "status": {k: v for k, v in decided.status.items() if v is not None}}
    return decided, bot


def tick(bot, now):
    decided = settle(bot, Observed(secrets=ALL_SECRETS), now=now)
    return decided, {**bot, "status": {k: v for k, v in decided.status.items() if v is not None}}


def request_of(manifest) -> dict:
    return json.loads(manifest["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"])


def test_a_scheduled_bot_retrains_only_on_new_posts_extending_the_last_run():
    bot = scheduled()
    _, bot = tick(bot, at(22, 10))  # the first run starts at creation, as any bot's
    first = bot["status"]["runId"]
    assert "scheduleTime" not in bot["status"]
    decided, bot = finish_run(bot, at(22, 12))
    assert bot["status"]["phase"] == "Succeeded"
    assert bot["status"]["nextScheduleTime"] == "2026-11-23T04:00:00Z"
    assert decided.requeue_after == 16 * 3600
    assert bot["status"]["history"][0] == {
        "runId": first, "outcome": "Succeeded", "specDigest": bot["status"]["specDigest"], "modelRunId": first,
        "startTime": "2026-11-22T10:00:00Z", "completionTime": "2026-11-22T12:00:00Z", "posts": 120, "newPosts": 120,
        "evalLoss": 2.5, "hubCommit": f"c-{first}"}

    decided, bot = tick(bot, at(23, 3, 59))
    assert decided.create == [] and bot["status"]["runId"] == first

    # The tick: a new run whose scrape extends the first run's posts; the first run's model is still the bot's.
    decided, bot = tick(bot, at(23, 4, 0))
    second = bot["status"]["runId"]
    assert second != first and bot["status"]["scheduleTime"] == bot["status"]["lastScheduleTime"] == "2026-11-23T04:00:00Z"
    assert [m["metadata"]["labels"]["huggingtweets.dev/stage"] for m in decided.create] == ["scrape"]
    assert request_of(decided.create[0])["extends_run"] == first
    assert bot["status"]["artifacts"]["hubCommit"] == f"c-{first}" and bot["status"]["phase"] == "Scraping"

    # No new posts: no train Job, the run ends UpToDate.
    decided, bot = finish_run(bot, at(23, 4, 5), new_posts=0, train=False)
    assert decided.create == []
    assert bot["status"]["phase"] == "Succeeded" and condition(bot["status"], "Ready")["reason"] == "UpToDate"
    assert "0 new post(s)" in condition(bot["status"], "Ready")["message"]
    assert bot["status"]["progress"]["summary"] == "up to date"
    assert bot["status"]["artifacts"]["hubCommit"] == f"c-{first}"
    assert [(e["runId"], e["outcome"], e["modelRunId"]) for e in bot["status"]["history"]] == [
        (second, "UpToDate", first), (first, "Succeeded", first)]

    # The next tick extends the run that trained the model, not the up-to-date one: new posts count from the
    # model, so a trickle adds up to minNewPosts. With enough, it trains.
    decided, bot = tick(bot, at(24, 4, 0))
    third = bot["status"]["runId"]
    assert request_of(decided.create[0])["extends_run"] == first
    scrape = job(bot, "scrape", "Succeeded")
    decided = settle(bot, Observed(jobs=[scrape], secrets=ALL_SECRETS, results={
        scrape["metadata"]["name"]: result(bot, "scrape", metrics={"posts": 125, "newPosts": 5})}), now=at(24, 4, 5))
    [train] = decided.create
    assert train["metadata"]["labels"]["huggingtweets.dev/stage"] == "train"
    assert request_of(train)["starts_from_run"] == ""  # resumeFrom: base
    _, bot = finish_run(bot, at(24, 5), new_posts=5)
    assert [(e["runId"], e["outcome"], e["modelRunId"]) for e in bot["status"]["history"]][0] == (third, "Succeeded", third)


def test_resume_from_previous_starts_training_from_the_last_model():
    bot = scheduled(resumeFrom="previous")
    _, bot = tick(bot, at(22, 10))
    first = bot["status"]["runId"]
    _, bot = finish_run(bot, at(22, 12))
    _, bot = tick(bot, at(23, 4))
    _, bot = finish_run(bot, at(23, 4, 5), new_posts=0, train=False)  # up to date: the model is still the first's
    _, bot = tick(bot, at(24, 4))
    scrape = job(bot, "scrape", "Succeeded")
    decided = settle(bot, Observed(jobs=[scrape], secrets=ALL_SECRETS, results={
        scrape["metadata"]["name"]: result(bot, "scrape", metrics={"posts": 125, "newPosts": 5})}), now=at(24, 4, 5))
    assert request_of(decided.create[0])["starts_from_run"] == first


def test_no_tick_while_a_run_goes_on_or_a_change_waits_and_none_when_suspended():
    bot = scheduled()
    _, bot = tick(bot, at(22, 10))
    running = bot["status"]["runId"]
    decided = settle(bot, Observed(jobs=[job(bot, "scrape", "Running")], secrets=ALL_SECRETS), now=at(23, 4, 1))
    assert decided.status["runId"] == running and decided.create == []  # the first run is still scraping
    _, bot = finish_run(bot, at(23, 6))
    decided, bot = tick(bot, at(23, 6, 1))  # the tick it missed starts now, once
    assert bot["status"]["runId"] != running and bot["status"]["scheduleTime"] == "2026-11-23T04:00:00Z"

    paused = scheduled(suspend=True)
    _, paused = tick(paused, at(22, 10))
    _, paused = finish_run(paused, at(22, 12))
    decided, paused = tick(paused, at(25, 4))
    assert decided.create == [] and "nextScheduleTime" not in paused["status"]

    # An edit of what the model is made of starts its own run first; the tick comes after it.
    edited = scheduled()
    _, edited = tick(edited, at(22, 10))
    _, edited = finish_run(edited, at(22, 12))
    edited["spec"]["training"] = {"epochs": 9}
    edited["metadata"]["generation"] = 2
    _, edited = tick(edited, at(23, 5))
    assert "scheduleTime" not in edited["status"] and edited["status"]["runId"] == run_id_for(edited)


def test_a_run_control_edit_keeps_a_scheduled_run_and_history_is_capped():
    bot = scheduled()
    bot["spec"]["historyLimit"] = 2
    _, bot = tick(bot, at(22, 10))
    _, bot = finish_run(bot, at(22, 12))
    for day in (23, 24):
        _, bot = tick(bot, at(day, 4))
        ticked = bot["status"]["runId"]
        bot["spec"]["backoffLimit"] = day  # run control, mid-run
        bot["metadata"]["generation"] += 1
        _, bot = tick(bot, at(day, 4, 1))
        assert bot["status"]["runId"] == ticked
        _, bot = finish_run(bot, at(day, 5), new_posts=0, train=False)
    assert [e["scheduleTime"] for e in bot["status"]["history"]] == ["2026-11-24T04:00:00Z", "2026-11-23T04:00:00Z"]


def test_every_stage_of_a_trained_scheduled_run_is_named_for_its_run():
    bot = scheduled()
    _, bot = tick(bot, at(22, 10))
    _, bot = finish_run(bot, at(22, 12))
    _, bot = tick(bot, at(23, 4))
    decided, bot = finish_run(bot, at(23, 5), new_posts=3)
    assert {stage: record["jobName"].split("-")[1] for stage, record in bot["status"]["stages"].items()} == dict.fromkeys(
        STAGES, bot["status"]["runId"][:5])
    assert bot["status"]["history"][0]["newPosts"] == 3 and bot["status"]["history"][0]["hubCommit"].endswith(bot["status"]["runId"])
    assert decided.requeue_after == pytest.approx((at(24, 4) - at(23, 5)).total_seconds())
    assert timedelta(seconds=decided.requeue_after) == timedelta(hours=23)
