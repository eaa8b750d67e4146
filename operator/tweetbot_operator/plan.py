"""The operator's pure core: a TweetBot and what exists for it -> what to read, write, create and delete.

`plan` is total and does no I/O. When it needs something the controller has not read yet (a Secret, a
stage's result, training progress, the training slots in use) it says so in `Plan.needs`, and the
controller reads exactly that and plans again. The status is the previous one carried over, with the
fields the operator owns recomputed: a field someone else added is kept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum

from tweetbot_trainer.contract import Progress, StageResult
from tweetbot_trainer.errors import is_permanent

from . import schedule as schedules
from .jobs import ended_at, job_state, parse_time
from .names import ENDED, FINALIZER, FINISHED, Condition, JobState, Phase, Reason, stage_reason
from .settings import Settings
from .spec import (
    SECRET_OPT_IN_LABEL,
    InvalidSpec,
    SecretView,
    rerun_requested,
    run_id_for,
    s3_identity,
    spec_digest,
    validate_spec,
    with_defaults,
)
from .stages import REGISTRY, Lineage, Stage, desired_job, job_name, secret_needs

MAX_RECORDED_RUNS = 500  # status.runs: what deletionPolicy Delete deletes
# The status fields that describe the current run; an invalid spec has no run and clears them.
RUN_FIELDS = ("runId", "startTime", "stages", "data", "metrics", "artifacts", "attempts", "progress")


class _NotRead(Enum):
    NOT_READ = "not read"


NOT_READ = _NotRead.NOT_READ


@dataclass(frozen=True)
class Needs:
    """What the controller must read before `plan` can decide."""

    secrets: tuple[str, ...] = ()  # Secrets of the bot's namespace, by name
    results: tuple[str, ...] = ()  # ended Jobs whose pods' termination messages are not in the status yet
    progress: bool = False  # the running train stage's report in S3
    training_slots: bool = False  # train Jobs of other bots holding the operator's training slots
    admission: tuple[str, ...] = ()  # queued Jobs whose Kueue Workload may say why they wait

    def __bool__(self) -> bool:
        return bool(self.secrets or self.results or self.progress or self.training_slots or self.admission)


@dataclass
class Observed:
    """What the controller read for one bot."""

    jobs: list[dict] = field(default_factory=list)
    # Results by Job name, for the Jobs `Needs.results` named; None: no pod reported one.
    results: Mapping[str, StageResult | None] = field(default_factory=dict)
    # Secrets by name, for those `Needs.secrets` named; None: no such Secret.
    secrets: Mapping[str, SecretView | None] = field(default_factory=dict)
    # Jobs the API server refused to create, with its message (quota, admission, a field it rejects).
    rejected: dict[str, str] = field(default_factory=dict)
    other_active_trainings: int | None = None  # None: not counted
    progress: Progress | None | _NotRead = NOT_READ  # None: no report (yet), or none the operator may read
    # Why Kueue keeps each queued Job of `Needs.admission` waiting; None: nothing says (or no Kueue).
    admission: Mapping[str, str | None] = field(default_factory=dict)


@dataclass
class Plan:
    needs: Needs = field(default_factory=Needs)  # if any: read them and plan again; nothing else is set
    finalizers: list[str] | None = None  # the bot's finalizers, when they must change
    delete_artifacts: bool = False  # the bot is being deleted and its runs' artifacts go first
    create: list[dict] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    status: dict | None = None  # None: the status stays as it is
    # A new bot's first Job goes out before anything else is written: its status (and event) follow in
    # the pass its ADDED event brings, queued behind other new bots.
    first_job_only: bool = False
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    requeue_after: float | None = None  # seconds until a finished Job's ttlSecondsAfterFinished is due


@dataclass(frozen=True)
class _Outcome:
    phase: Phase
    reason: str
    message: str = ""
    stalled: bool = False


class _Unread(Exception):
    def __init__(self, needs: Needs):
        self.needs = needs


def timestamp(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan(bot: dict, observed: Observed, settings: Settings, now: datetime) -> Plan:
    """Decide the next step of a bot and the status that describes it."""
    metadata = bot["metadata"]
    finalizers = metadata.get("finalizers") or []
    others = [finalizer for finalizer in finalizers if finalizer != FINALIZER]
    delete_policy = with_defaults(bot)["deletionPolicy"] == "Delete"
    if metadata.get("deletionTimestamp"):
        # Released once the artifacts are gone, or at once if the policy was changed to Retain (the way out
        # when S3 or the credentials are gone for good).
        return Plan(finalizers=others, delete_artifacts=delete_policy) if FINALIZER in finalizers else Plan()
    try:
        validate_spec(bot, settings)
        invalid = None
    except InvalidSpec as error:
        invalid = error
    wanted = others + [FINALIZER] if delete_policy and invalid is None else others
    result = Plan(finalizers=wanted if wanted != finalizers else None)
    old_status = bot.get("status") or {}
    if invalid is not None:
        status = {**old_status, **dict.fromkeys(RUN_FIELDS), "runs": old_status.get("runs") or []}
        return _finish(result, old_status, status, metadata.get("generation"), now,
                       _Outcome(Phase.FAILED, Reason.INVALID_SPEC, str(invalid), stalled=True), done=0)
    try:
        return _plan_run(bot, observed, settings, now, result)
    except _Unread as unread:
        return Plan(needs=unread.needs)


def _plan_run(bot: dict, observed: Observed, settings: Settings, now: datetime, result: Plan) -> Plan:
    spec, old_status = with_defaults(bot), bot.get("status") or {}
    tick = _due_tick(bot, spec, old_status, now)
    run_id = run_id_for(bot, tick)
    same_run = old_status.get("runId") == run_id
    schedule_time = tick or (old_status.get("scheduleTime") if same_run else None)
    recorded = (old_status.get("stages") or {}) if same_run else {}
    jobs = {job["metadata"]["name"]: job for job in observed.jobs}
    names = {stage: _current_job_name(bot, run_id, stage, recorded.get(stage) or {}, old_status) for stage in REGISTRY}
    _need_results(jobs, recorded, set(names.values()), observed)
    # The old runs' Jobs, and this run's Jobs of a stage that re-runs on an edit (publish, for output.hub).
    result.delete = sorted(set(jobs) - set(names.values()))
    status = {
        **old_status,
        "runId": run_id,
        "specDigest": spec_digest(bot),
        "rerun": rerun_requested(bot) or None,  # the annotation this run answers
        "scheduleTime": schedule_time,  # the tick this run answers
        "lastScheduleTime": tick or old_status.get("lastScheduleTime"),
        "nextScheduleTime": _next_schedule_time(spec, now),
        "startTime": old_status.get("startTime") if same_run and old_status.get("startTime") else timestamp(now),
        "stages": {},
        "data": old_status.get("data") if same_run else None,
        "metrics": old_status.get("metrics") if same_run else None,
        # A scheduled run's model is the last one's until it trains one (the rest the same run, or nothing).
        "artifacts": dict(old_status.get("artifacts") or {}) if same_run or schedule_time else {},
        "attempts": 0,
        "progress": None,
        # Every run this bot started, so that deleting it deletes exactly its own artifacts.
        "runs": list(dict.fromkeys([*(old_status.get("runs") or []), run_id]))[-MAX_RECORDED_RUNS:],
    }
    lineage = _lineage(spec, old_status.get("history") or [], status["specDigest"]) if schedule_time else Lineage()
    walk = _Walk(bot, spec, run_id, names, lineage, observed, settings, jobs, recorded, status, result)
    outcome = walk.run()
    up_to_date = outcome.reason == Reason.UP_TO_DATE
    status["progress"] = status["progress"] or {"summary": "up to date" if up_to_date else f"{walk.done}/{len(REGISTRY)}"}
    if spec.get("ttlSecondsAfterFinished") is not None:
        expired, result.requeue_after = _expired_jobs(jobs, recorded, status["stages"], spec["ttlSecondsAfterFinished"], now)
        result.delete += expired
    if status["nextScheduleTime"]:
        due = max((parse_time(status["nextScheduleTime"]) - now).total_seconds(), 1.0)
        result.requeue_after = min(result.requeue_after or due, due)
    if outcome.phase in FINISHED:
        status["history"] = _history(status, old_status.get("history") or [], outcome, spec["historyLimit"], now)
    result.first_job_only = bool(result.create) and not old_status
    return _finish(result, old_status, status, bot["metadata"].get("generation"), now, outcome, walk.done)


def _active_schedule(spec: dict) -> dict | None:
    """spec.schedule, unless it or the bot is suspended."""
    schedule = spec.get("schedule")
    return schedule if schedule and not schedule["suspend"] and not spec["suspend"] else None


def _due_tick(bot: dict, spec: dict, old_status: dict, now: datetime) -> str:
    """The spec.schedule tick that starts a run now, or "": only once the current run has finished and no change
    waits for a run of its own."""
    schedule = _active_schedule(spec)
    if not schedule:
        return ""
    if old_status.get("phase") not in FINISHED or run_id_for(bot) != old_status.get("runId"):
        return ""
    since = old_status.get("lastScheduleTime") or bot["metadata"].get("creationTimestamp") or old_status.get("startTime")
    tick = schedules.due_tick(schedule, parse_time(since), now) if since else None
    return timestamp(tick) if tick else ""


def _next_schedule_time(spec: dict, now: datetime) -> str | None:
    schedule = _active_schedule(spec)
    return timestamp(schedules.next_tick(schedule, now)) if schedule else None


def _lineage(spec: dict, history: list[dict], digest: str) -> Lineage:
    """The earlier runs of the same spec a scheduled run builds on: the one that trained the bot's model (its
    posts are extended, so new posts count from it, not from an UpToDate run since: a trickle adds up to
    minNewPosts), else the newest that scraped; and with resumeFrom previous, that model."""
    same = [entry for entry in history if entry.get("specDigest") == digest]
    model = next((entry["modelRunId"] for entry in same if entry.get("modelRunId")), "")
    scraped = next((entry["runId"] for entry in same if "posts" in entry), "")
    resume = (spec.get("schedule") or {}).get("resumeFrom") == "previous"
    return Lineage(extends_run=model or scraped, starts_from_run=model if resume else "")


def _history(status: dict, history: list[dict], outcome: _Outcome, limit: int, now: datetime) -> list[dict]:
    """The finished run first (replacing its own earlier entry: a re-publish), then the older ones, `limit` in all."""
    earlier = [entry for entry in history if entry.get("runId") != status["runId"]]
    up_to_date = outcome.reason == Reason.UP_TO_DATE
    trained = outcome.phase == Phase.SUCCEEDED and not up_to_date
    previous_model = next((entry.get("modelRunId") for entry in earlier if entry.get("specDigest") == status["specDigest"]), None)
    scraped = (status["stages"].get("scrape") or {}).get("state") == JobState.SUCCEEDED
    metrics, artifacts = status.get("metrics") or {}, status.get("artifacts") or {}
    entry = {
        "runId": status["runId"], "outcome": "UpToDate" if up_to_date else str(outcome.phase),
        "specDigest": status["specDigest"], "modelRunId": status["runId"] if trained else previous_model,
        "scheduleTime": status.get("scheduleTime"), "startTime": status.get("startTime"),
        "completionTime": status.get("completionTime") or timestamp(now),
        "posts": metrics.get("posts") if scraped else None, "newPosts": metrics.get("newPosts") if scraped else None,
        "evalLoss": metrics.get("evalLoss") if trained else None, "hubCommit": artifacts.get("hubCommit") if trained else None,
    }
    return [{key: value for key, value in entry.items() if value is not None}, *earlier][:limit]


def _current_job_name(bot: dict, run_id: str, stage: str, record: dict, old_status: dict) -> str:
    """The stage's Job name; a Job an earlier operator named without the digest of the field its stage re-runs on
    stays the stage's Job while the spec has not changed since."""
    name = job_name(bot, run_id, stage)
    unsuffixed = job_name(bot, run_id, stage, rerun_digest=False)
    if (name != unsuffixed and record.get("jobName") == unsuffixed
            and old_status.get("observedGeneration") == bot["metadata"].get("generation")):
        return unsuffixed
    return name


def _need_results(jobs: dict[str, dict], recorded: dict, current: set[str], observed: Observed) -> None:
    """The run's ended Jobs whose result is not in the status yet must be read first."""
    kept = {record.get("jobName") for record in recorded.values() if record.get("state") == JobState.SUCCEEDED}
    missing = tuple(name for name, job in jobs.items()
                    if name in current and name not in kept and job_state(job) in ENDED and name not in observed.results)
    if missing:
        raise _Unread(Needs(results=missing))


@dataclass
class _Walk:
    """The stages in order: each recorded success is kept, and the first stage not done decides the phase."""

    bot: dict
    spec: dict
    run_id: str
    names: dict[str, str]  # the Job name of each stage
    lineage: Lineage
    observed: Observed
    settings: Settings
    jobs: dict[str, dict]
    recorded: dict
    status: dict
    result: Plan
    done: int = 0

    def run(self) -> _Outcome:
        for stage in REGISTRY.values():
            name = self.names[stage.name]
            record = self.recorded.get(stage.name) or {}
            if record.get("jobName") == name and record.get("state") == JobState.SUCCEEDED:
                self.status["stages"][stage.name] = record  # kept even after the Job's TTL removed it
                self.status["attempts"] += max(0, record.get("attempts", 1) - 1)  # its failed pods before it succeeded
                self.done += 1
                continue
            job = self.jobs.get(name)
            up_to_date = stage.up_to_date(self.spec, self.status) if job is None and not record else ""
            if up_to_date:
                self.done = len(REGISTRY)  # the model stands, trained and published by an earlier run
                return _Outcome(Phase.SUCCEEDED, Reason.UP_TO_DATE, up_to_date)
            outcome = self._absent(stage, name, record) if job is None else self._present(stage, name, job, record)
            if outcome is not None:
                return outcome
            self.done += 1
        return _Outcome(Phase.SUCCEEDED, Reason.SUCCEEDED, "scraped, trained and published")

    def _absent(self, stage: Stage, name: str, record: dict) -> _Outcome:
        """The stage has no Job: it failed and its Job was since removed, or its Job is due."""
        if record.get("jobName") == name and record.get("state") == JobState.FAILED:
            self.status["stages"][stage.name] = record  # stays failed until an edit
            return _Outcome(Phase.FAILED, Reason.STAGE_FAILED,
                            f"stage {stage.name} failed: {record.get('message', '')}".rstrip(": "), stalled=True)
        if self.spec["suspend"]:
            return _Outcome(Phase.SUSPENDED, Reason.SUSPENDED, "spec.suspend is true")
        missing = self._missing_secrets(stage)
        if missing:
            return _Outcome(Phase.PENDING, Reason.SECRET_MISSING, missing, stalled=True)
        if name in self.observed.rejected:
            return _Outcome(Phase.PENDING, Reason.JOB_REJECTED,
                            f"the API server refused Job {name}: {self.observed.rejected[name]}", stalled=True)
        limit = self.settings.max_concurrent_trainings
        if stage.name == "train" and limit:
            if self.observed.other_active_trainings is None:
                raise _Unread(Needs(training_slots=True))
            if self.observed.other_active_trainings >= limit:
                return _Outcome(Phase.QUEUED, Reason.WAITING_FOR_TRAINING_SLOT,
                                f"all {limit} training slots of the operator are in use")
        self.result.create.append(desired_job(self.bot, self.run_id, stage.name, self.settings, name, self.lineage))
        self.status["stages"][stage.name] = {"jobName": name, "state": JobState.PENDING, **_restarts(record, name)}
        return _Outcome(stage.phase, Reason.JOB_CREATED, f"created Job {name}")

    def _present(self, stage: Stage, name: str, job: dict, record: dict) -> _Outcome | None:
        """The stage's Job exists: None if it succeeded with a result, else what it is doing or why it failed."""
        state, job_status = job_state(job), job.get("status") or {}
        self.status["attempts"] += job_status.get("failed", 0)
        stage_status = {"jobName": name, "state": JobState.PENDING if state == JobState.QUEUED else state,
                        "attempts": job_status.get("failed", 0) + job_status.get("succeeded", 0) + job_status.get("active", 0)}
        stage_status.update({key: job_status[key] for key in ("startTime", "completionTime") if job_status.get(key)})
        stage_status.update(_restarts(record, name))
        pods = stage.pods(self.spec)
        if pods > 1 and state not in ENDED:
            stage_status.update(pods=pods, readyPods=job_status.get("ready", 0))
        self.status["stages"][stage.name] = stage_status
        if self.spec["suspend"] and state not in ENDED:
            self.result.delete.append(name)  # resumes from its checkpoint when recreated
            del self.status["stages"][stage.name]
            return _Outcome(Phase.SUSPENDED, Reason.SUSPENDED, "spec.suspend is true; the running stage was stopped")
        if state == JobState.SUCCEEDED:
            stage_result = self.observed.results.get(name)
            if stage_result is None or not stage_result.ok:
                stage_status["state"] = JobState.FAILED
                return _Outcome(Phase.FAILED, Reason.NO_STAGE_RESULT,
                                f"stage {stage.name} (Job {name}) exited successfully but reported no result", stalled=True)
            _apply_result(self.status, stage_result)
            return None
        if state == JobState.FAILED:
            stage_status["message"] = detail = _failure_detail(self.observed.results.get(name), record, name, job_status)
            restart = self._gang_restart(stage, name, job, record, stage_status, detail)
            if restart is not None:
                return restart
            return _Outcome(Phase.FAILED, Reason.STAGE_FAILED,
                            f"stage {stage.name} failed after {job_status.get('failed', 0)} attempt(s): {detail}".rstrip(": "),
                            stalled=True)
        if stage.name == "train" and state == JobState.RUNNING:
            self.status["progress"] = self._live_progress()
        if state == JobState.QUEUED:
            if name not in self.observed.admission:
                raise _Unread(Needs(admission=(name,)))
            waiting = self.observed.admission[name]
            return _Outcome(Phase.QUEUED, Reason.QUEUED, f"Job {name} is queued" + (f": {waiting}" if waiting else ""))
        return _Outcome(stage.phase, stage_reason(stage.name, state), f"Job {name} is {state.lower()}")

    def _gang_restart(self, stage: Stage, name: str, job: dict, record: dict, stage_status: dict, detail: str) -> _Outcome | None:
        """A multi-node training's failed attempt starts again as a whole, as JobSet restarts its Jobs: the Job
        goes and is created anew, every pod resuming from the newest checkpoint all of them completed; at most
        backoffLimit times, and not for an error no retry can mend. None: the stage failed."""
        pods, limit = stage.pods(self.spec), self.spec["backoffLimit"]
        if pods == 1:
            return None
        failed = _failed_pod(job, name)
        if failed is not None:
            stage_status["failedPod"] = failed
        if is_permanent(detail):
            return None
        restarts, uid = (record.get("restarts", 0) if record.get("jobName") == name else 0), job["metadata"].get("uid", "")
        answered = record.get("restartedJob") == uid
        if not answered:
            if restarts >= limit:
                return None
            restarts += 1
        self.result.delete.append(name)
        stage_status.update(state=JobState.PENDING, restarts=restarts, restartedJob=uid)
        which = "a pod" if failed is None else f"pod {failed}"
        message = (f"{which} of Job {name} failed ({detail}); its {pods} pods start again from the newest checkpoint "
                   f"(restart {restarts} of {limit})").replace(" ()", "")
        if not answered:
            self.result.events.append(("Warning", Reason.GANG_RESTARTING, message))
        return _Outcome(stage.phase, Reason.GANG_RESTARTING, message)

    def _live_progress(self) -> dict | None:
        progress = self.observed.progress
        if progress is NOT_READ:
            if s3_identity(self.bot, self.settings) is None:
                return None  # the operator reads a bot's S3 only with an identity the bot may use
            raise _Unread(Needs(progress=True))
        return None if progress is None else _progress_status(progress)

    def _missing_secrets(self, stage: Stage) -> str:
        needs = secret_needs(self.bot, stage.name)
        unread = tuple(dict.fromkeys(need.name for need in needs if need.name not in self.observed.secrets))
        if unread:
            raise _Unread(Needs(secrets=unread))
        problems = []
        for need in needs:
            secret = self.observed.secrets[need.name]
            if secret is None:
                problems.append(f"Secret {need.name!r} (named by {need.field}) does not exist")
            elif not secret.opted_in:
                problems.append(f"Secret {need.name!r} (named by {need.field}) is not labelled "
                                f"{SECRET_OPT_IN_LABEL}=true; label it to let TweetBots use it")
            elif need.key not in secret.keys:
                problems.append(f"Secret {need.name!r} (named by {need.field}) has no key {need.key!r}")
        return "; ".join(dict.fromkeys(problems))


# The Job controller's message when a pod failure policy rule fails the Job: "Container train for pod <ns>/<pod>
# failed with exit code 1 matching FailJob rule at index 2".
_FAILED_POD = re.compile(r"for pod [^/\s]+/(\S+) failed")


def _failed_pod(job: dict, name: str) -> int | None:
    """The index of the gang's pod whose failure failed the Job (an Indexed Job's pods are <job>-<index>-<suffix>)."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        found = _FAILED_POD.search(condition.get("message") or "") if condition.get("type") in ("Failed", "FailureTarget") else None
        index = found.group(1).removeprefix(f"{name}-").split("-")[0] if found else ""
        if index.isdigit():
            return int(index)
    return None


def _restarts(record: dict, name: str) -> dict:
    """A gang's restarts so far and the pod that failed last, carried to its next Job of the same name."""
    if record.get("jobName") != name:
        return {}
    return {key: record[key] for key in ("restarts", "failedPod") if record.get(key) is not None}


def _failure_detail(stage_result: StageResult | None, record: dict, name: str, job_status: dict) -> str:
    """Why a stage failed: its own report, else what the status already said, else the Job's condition."""
    if stage_result is not None and stage_result.error:
        return stage_result.error
    if record.get("jobName") == name and record.get("message"):
        return record["message"]
    failure = next((c for c in job_status.get("conditions") or [] if c.get("type") == "Failed"), {})
    return failure.get("message", "")


def _expired_jobs(jobs: dict[str, dict], recorded: dict, stages: dict, ttl: int, now: datetime) -> tuple[list[str], float | None]:
    """Finished Jobs whose result the status held before this pass and whose TTL has run out, and the seconds
    until the next one is due (Jobs this pass records are due no earlier than the next pass)."""
    expired, next_due = [], None
    for stage, record in stages.items():
        job = jobs.get(record.get("jobName"))
        ended = ended_at(job) if job is not None and record.get("state") in ENDED else None
        if ended is None:
            continue
        due = (ended - now).total_seconds() + ttl
        if due <= 0 and (recorded.get(stage) or {}).get("state") == record["state"]:
            expired.append(record["jobName"])
        else:
            next_due = min(next_due or float("inf"), max(due, 1.0))
    return expired, next_due


def _progress_status(progress: Progress) -> dict:
    live = {"step": progress.step, "totalSteps": progress.total_steps,
            "summary": f"train {progress.percent}% ({progress.step}/{progress.total_steps} steps)"}
    for key, value in (("loss", progress.loss), ("tokensPerSecond", progress.tokens_per_second),
                       ("etaSeconds", progress.eta_seconds), ("updatedAt", progress.updated_at)):
        if value is not None:
            live[key] = value
    return live


def _apply_result(status: dict, stage_result: StageResult) -> None:
    if stage_result.data:
        status["data"] = [
            {key: value for key, value in vars(stats).items() if value != ""} for stats in stage_result.data
        ]
    if stage_result.metrics:  # each stage's own: the scrape's post counts stay beside the train's loss
        status["metrics"] = {**(status.get("metrics") or {}), **stage_result.metrics}
    # An empty value withdraws an artifact an earlier Job of the stage reported (a Hub URL after output.hub went).
    for key, value in stage_result.artifacts.items():
        if value:
            status["artifacts"][key] = value
        else:
            status["artifacts"].pop(key, None)


def _condition(old: list[dict], type_: str, true: bool, reason: str, message: str, generation, now: datetime) -> dict:
    value = "True" if true else "False"
    previous = next((c for c in old if c.get("type") == type_), None)
    changed_at = previous["lastTransitionTime"] if previous and previous.get("status") == value else timestamp(now)
    return {"type": type_, "status": value, "reason": reason, "message": message,
            "lastTransitionTime": changed_at, "observedGeneration": generation}


def _finish(result: Plan, old_status: dict, status: dict, generation, now: datetime, outcome: _Outcome, done: int) -> Plan:
    """The conditions, phase and events that follow from the outcome."""
    phase, reason, message, stalled = outcome.phase, outcome.reason, outcome.message, outcome.stalled
    old_conditions = old_status.get("conditions") or []
    terminal = phase in FINISHED
    conditions = [
        _condition(old_conditions, Condition.READY, phase == Phase.SUCCEEDED, reason, message, generation, now),
        _condition(old_conditions, Condition.RECONCILING, not terminal and phase != Phase.SUSPENDED and not stalled,
                   reason, message, generation, now),
        _condition(old_conditions, Condition.STALLED, stalled, reason if stalled else Reason.NOT_STALLED,
                   message if stalled else "", generation, now),
    ]
    for index, stage in enumerate(REGISTRY.values()):
        finished = index < done
        conditions.append(_condition(old_conditions, stage.condition, finished,
                                     Reason.STAGE_SUCCEEDED if finished else Reason.STAGE_NOT_FINISHED, "", generation, now))
    status.update(phase=phase, observedGeneration=generation, conditions=conditions,
                  lastError=message if phase == Phase.FAILED or stalled else None)
    if terminal:
        status["completionTime"] = old_status.get("completionTime") if old_status.get("phase") == phase else timestamp(now)
    else:
        status["completionTime"] = None
    if old_status.get("phase") != phase:
        event_type = "Warning" if phase == Phase.FAILED or stalled else "Normal"
        result.events.append((event_type, reason, f"{phase}: {message}" if message else phase))
    elif stalled and old_status.get("lastError") != message:
        result.events.append(("Warning", reason, message))
    result.status = status
    return result


def status_patch(old: dict, new: dict) -> dict:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: nested objects are merged, so every
    field `new` drops must be named with null."""
    patch = {}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            nested = status_patch(old[key], value)
            if nested:
                patch[key] = nested
        elif old.get(key) != value:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch
