"""What `kubectl tweetbot` decides from a TweetBot and what the cluster holds, as plain functions: the table
`get` prints, whether `wait` is done, which Job and pods `logs` means, where a run's model and samples are in
S3 and on the Hub, which endpoint gets the user's credentials, which files `download` fetches, how generated
and status text reaches the terminal, and the exit codes. No client: `kubectl_plugin` reads and writes around
these.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import IntEnum
from pathlib import PurePosixPath
from typing import Mapping
from urllib.parse import urlsplit

from tweetbot_trainer.contract import STAGES

from .jobs import COMPLETION_INDEX_ANNOTATION, parse_time
from .names import ENDED, FINISHED, RERUN_ANNOTATION, Condition, Phase


class Exit(IntEnum):
    """The plugin's exit codes; `kubectl tweetbot --help` and the user guide list them."""

    OK = 0
    ERROR = 1  # the API server or S3 refused, the bot does not exist, anything unforeseen
    USAGE = 2  # a command line argparse refuses
    FAILED = 3  # wait: the run failed (phase Failed); its lastError is printed
    STALLED = 4  # wait: Stalled is True, the bot waits for a fix (a Secret, a refused Job); the message is printed
    TIMEOUT = 5  # wait: neither within --timeout; samples, download, generate: the S3 or Hub transfer did not end in it
    UNAVAILABLE = 6  # logs, samples, download, generate: what was asked for is not there (not yet, or cleaned up)


EXIT_CODES_HELP = "exit codes: " + ", ".join(f"{code.value} {code.name.lower()}" for code in Exit)


class Refusal(Exception):
    """Something the plugin cannot do, told to the user as it is, with the exit code it ends with."""

    def __init__(self, message: str, code: Exit = Exit.ERROR):
        super().__init__(message)
        self.code = code


# --- get ---------------------------------------------------------------------------------------------------

COLUMNS = ("NAME", "PHASE", "PROGRESS", "ETA", "LOSS", "HUB", "AGE")
NONE = "-"  # an empty cell: whitespace-separated columns stay aligned for awk and cut


def human_duration(seconds: float) -> str:
    """kubectl's way of telling an age (`duration.HumanDuration`): 45s, 3m20s, 95m, 5h10m, 30h, 3d4h, 12d, 3y45d."""
    seconds = max(0, int(seconds))
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 192:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    years = days // 365
    return f"{years}y{days % 365}d" if days % 365 else f"{years}y"


def row(bot: dict, now: datetime) -> dict[str, str]:
    """One bot's cells of the `get` table, by column."""
    status = bot.get("status") or {}
    phase = status.get("phase") or ""
    progress = status.get("progress") or {}
    metrics = status.get("metrics") or {}
    eta = progress.get("etaSeconds")
    # While it trains, the live loss of the last logged step; after, the evaluation's.
    loss = progress.get("loss") if phase == Phase.TRAINING else None
    if loss is None:
        loss = metrics.get("evalLoss", progress.get("loss"))
    created = bot["metadata"].get("creationTimestamp")
    return {
        "NAMESPACE": bot["metadata"].get("namespace") or NONE,
        "NAME": bot["metadata"]["name"],
        "PHASE": phase or NONE,
        "PROGRESS": progress.get("summary") or NONE,
        "ETA": human_duration(eta) if eta is not None and phase not in FINISHED else NONE,
        "LOSS": f"{loss:.3f}" if isinstance(loss, (int, float)) else NONE,
        "HUB": (status.get("artifacts") or {}).get("hubUrl") or NONE,
        "AGE": human_duration((now - parse_time(created)).total_seconds()) if created else NONE,
    }


def table(bots: list[dict], now: datetime, all_namespaces: bool = False) -> str:
    """kubectl's table: upper-case headers, columns three spaces apart; a cell with whitespace or control
    characters cannot break a line or shift the columns (a Hub URL is the bot author's to choose)."""
    columns = ("NAMESPACE", *COLUMNS) if all_namespaces else COLUMNS
    rows = [[_cell(cells[column]) for column in columns] for cells in (row(bot, now) for bot in bots)]
    widths = [max(len(line[index]) for line in [list(columns), *rows]) for index in range(len(columns))]
    lines = ["   ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [list(columns), *rows]]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return re.sub(r"\s", "_", "".join(c if c.isprintable() else "?" for c in text)) or NONE


def for_output(bots: list[dict], single: bool) -> dict:
    """What `-o json|yaml` prints: the bot, or a List as kubectl prints one; managedFields left out as
    kubectl leaves them out."""
    cleaned = []
    for bot in bots:
        metadata = {key: value for key, value in bot["metadata"].items() if key != "managedFields"}
        cleaned.append({**bot, "metadata": metadata})
    if single:
        return cleaned[0]
    return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": cleaned}


# --- wait --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    code: Exit
    message: str


def wait_verdict(bot: dict) -> Verdict | None:
    """Whether `wait` is done with this copy of the bot: Ready True for the current generation and the current
    rerun annotation (Succeeded), Failed, or Stalled True; None: not yet. A status the operator wrote for an
    older generation or rerun value says nothing about the run asked for. The message shows the status's texts
    as `one_line` does: a stage's error can quote a scraped post."""
    metadata, status = bot["metadata"], bot.get("status") or {}
    generation = metadata.get("generation")
    name = f"tweetbot {metadata.get('namespace', '')}/{metadata['name']}".replace(" /", " ")
    if status.get("observedGeneration") != generation:
        return None
    if (status.get("rerun") or "") != ((metadata.get("annotations") or {}).get(RERUN_ANNOTATION) or ""):
        return None
    conditions = {c.get("type"): c for c in status.get("conditions") or []}

    def true(kind: str) -> dict | None:
        condition = conditions.get(kind) or {}
        current = condition.get("observedGeneration", generation) == generation
        return condition if condition.get("status") == "True" and current else None

    if true(Condition.READY):
        where = (status.get("artifacts") or {}).get("hubUrl") or (status.get("artifacts") or {}).get("modelUri")
        return Verdict(Exit.OK, one_line(f"{name} is {Phase.SUCCEEDED} (run {status.get('runId', '?')})"
                                         + (f": {where}" if where else "")))
    stalled = true(Condition.STALLED)
    if status.get("phase") == Phase.FAILED:
        why = status.get("lastError") or (stalled or {}).get("message") or "no message"
        return Verdict(Exit.FAILED, one_line(f"{name} is {Phase.FAILED} (run {status.get('runId', '?')}): {why}"))
    if stalled:
        why = status.get("lastError") or stalled.get("message") or "no message"
        return Verdict(Exit.STALLED, one_line(f"{name} is stalled ({stalled.get('reason', '?')}): {why}"))
    return None


def still_waiting(bot: dict) -> str:
    status = bot.get("status") or {}
    return one_line(f"phase {status.get('phase') or 'not set yet'}, "
                    f"progress {(status.get('progress') or {}).get('summary') or '-'}")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str) -> float:
    """Seconds of a Go-style duration as kubectl takes them (30m, 1h30m, 90s, 500ms) or a plain number of seconds."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = _DURATION.findall(text)
    if not text or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"{text!r} is not a duration (e.g. 30m, 1h30m, 90s)")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(number) * scale[unit] for number, unit in parts)


# --- rerun -------------------------------------------------------------------------------------------------


def rerun_value(now: datetime, current: str = "") -> str:
    """The rerun annotation's new value: the UTC time (as `date -u +%FT%TZ`), with microseconds if the second's
    value is already there (the operator answers each value once)."""
    value = now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if value == current else value


def rerun_patch(value: str) -> dict:
    return {"metadata": {"annotations": {RERUN_ANNOTATION: value}}}


# --- logs --------------------------------------------------------------------------------------------------

ACTIVE_STATES = ("Pending", "Queued", "Running")


@dataclass(frozen=True)
class LogsTarget:
    bot: str
    stage: str
    job: str
    run_id: str


def logs_target(bot: dict, stage: str | None = None) -> LogsTarget:
    """The current run's Job of `stage`; without one, of the stage that runs, else of the last that started."""
    status = bot.get("status") or {}
    stages = status.get("stages") or {}
    name, run_id = bot["metadata"]["name"], status.get("runId") or "?"
    if stage is None:
        started = [each for each in STAGES if (stages.get(each) or {}).get("jobName")]
        running = [each for each in started if stages[each].get("state") in ACTIVE_STATES]
        if not started:
            raise Refusal(one_line(f"no stage of {name}'s run {run_id} has started yet "
                                   f"(phase {status.get('phase') or 'not set'})"), Exit.UNAVAILABLE)
        stage = (running or started)[-1]
    job = (stages.get(stage) or {}).get("jobName")
    if not job:
        raise Refusal(one_line(f"the {stage} stage of {name}'s run {run_id} has no Job "
                               f"(phase {status.get('phase') or 'not set'})"), Exit.UNAVAILABLE)
    return LogsTarget(name, stage, job, run_id)


def pods_to_show(pods: list[dict], all_pods: bool = False) -> list[tuple[int, dict]]:
    """(completion index, pod): the newest pod of each index (a retried pod leaves the failed one beside it),
    index 0 alone (a gang's rank 0, which alone reports) unless `all_pods`."""
    newest: dict[int, dict] = {}
    for pod in pods:
        metadata = pod["metadata"]
        index = int((metadata.get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION) or 0)
        age = (metadata.get("creationTimestamp") or "", metadata["name"])
        if index not in newest or age > (newest[index]["metadata"].get("creationTimestamp") or "", newest[index]["metadata"]["name"]):
            newest[index] = pod
    chosen = sorted(newest.items(), key=lambda item: item[0])
    return chosen if all_pods else chosen[:1]


def no_pods_message(bot: dict, target: LogsTarget, job: dict | None) -> str:
    """Why there is no pod to read: not started yet, or the Job and its pods were cleaned up (the results
    outlive them, in the status and in S3); the status's texts as `one_line` shows them."""
    return one_line(_no_pods(bot, target, job))


def _no_pods(bot: dict, target: LogsTarget, job: dict | None) -> str:
    stage_status = ((bot.get("status") or {}).get("stages") or {}).get(target.stage) or {}
    if job is not None and stage_status.get("state") not in ENDED:
        return f"the {target.stage} Job {target.job} of run {target.run_id} has no pod yet ({stage_status.get('state') or 'Pending'})"
    artifacts = (bot.get("status") or {}).get("artifacts") or {}
    message = f"the {target.stage} pods of run {target.run_id} were cleaned up (ttlSecondsAfterFinished)"
    if stage_status.get("message"):
        message += f"; the stage said: {stage_status['message']}"
    if target.stage == "scrape" and artifacts.get("datasetUri"):
        return message + f"; the dataset is in {artifacts['datasetUri']}"
    if artifacts.get("modelUri"):
        message += f"; the model is in {artifacts['modelUri']}"
    if target.stage == "publish" and artifacts.get("hubUrl"):
        message += f" and on the Hub at {artifacts['hubUrl']}"
    return message


def prefixed(index: int, line: str) -> str:
    return f"[{index}] {line}"


# --- S3: samples, download, generate -----------------------------------------------------------------------

SAMPLES_FILE = "samples.json"  # what the train stage writes beside the final model
MANIFEST_FILE = "manifest.json"  # written last: a model without it is not complete
CARD_FILE = "README.md"  # the model card, written beside the model by the publish stage, after the manifest
SAMPLES_BYTES = 1024 * 1024  # three generations of at most 160 tokens are a few KB
MANIFEST_BYTES = 1024 * 1024
MAX_FILES = 1000
DEFAULT_MAX_BYTES = 64 * 1024**3  # a 7B model in 32 bits is 28 GB
SAMPLES_TIMEOUT = "2m"  # --timeout of samples: one object of at most SAMPLES_BYTES
MODEL_TIMEOUT = "1h"  # --timeout of download and generate: 28 GB in an hour is 8 MB/s


@dataclass(frozen=True)
class ModelLocation:
    bucket: str
    prefix: str  # ends with '/'
    region: str
    endpoint: str  # the bot's spec.output.s3.endpoint ("" for AWS)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def model_location(bot: dict) -> ModelLocation:
    """The current model of the bot (`status.artifacts.modelUri`: a scheduled run that trained nothing keeps the
    last trained run's)."""
    status = bot.get("status") or {}
    uri = (status.get("artifacts") or {}).get("modelUri") or ""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise Refusal(one_line(f"{bot['metadata']['name']} has no model yet: status.artifacts.modelUri is empty "
                               f"(phase {status.get('phase') or 'not set'})"), Exit.UNAVAILABLE)
    # The URI reaches every message of the transfer: one the operator cannot have written is not read.
    if not uri.isprintable():
        raise Refusal(f"status.artifacts.modelUri {one_line(uri)} is not a plain s3:// URI")
    s3 = ((bot.get("spec") or {}).get("output") or {}).get("s3") or {}
    prefix = parts.path.lstrip("/")
    return ModelLocation(parts.netloc, prefix if prefix.endswith("/") else prefix + "/",
                         s3.get("region") or "us-east-1", s3.get("endpoint") or "")


def s3_endpoint(flag: str | None, environ: Mapping[str, str], location: ModelLocation) -> str | None:
    """--s3-endpoint, else boto3's own AWS_ENDPOINT_URL(_S3) (None: boto3 reads it), else AWS (None). The bot's
    spec.output.s3.endpoint is its author's choice, and the user's AWS credentials would sign requests to it:
    refused until the user names it."""
    if flag:
        return flag
    if environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL"):
        return None
    if location.endpoint:
        endpoint = one_line(location.endpoint)
        raise Refusal(f"the bot's spec.output.s3.endpoint {endpoint} is not an endpoint you chose, and your AWS credentials "
                      f"go only to AWS or to one you name: if you trust it, pass --s3-endpoint {endpoint}")
    return None


def sample_lines(payload: bytes) -> list[str]:
    """The samples, one a line, as `one_line` shows them (a newline inside one as \\n, an escape as \\x1b)."""
    try:
        samples = json.loads(payload)
    except ValueError:
        samples = None
    if not isinstance(samples, list) or not all(isinstance(sample, str) for sample in samples):
        raise Refusal(f"{SAMPLES_FILE} is not a list of texts")
    return [one_line(sample) for sample in samples]


# What a terminal obeys rather than shows: C0 and C1 controls (ESC starts ANSI sequences, 0x9b is a one-byte
# CSI), the bidi embeddings, overrides and isolates that reorder what is shown, and the line separators that
# some readers split lines at. A tab stays; emoji joiners and other format characters are printable.
_ESCAPES = {
    **{code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7f, 0xa0)] if code != ord("\t")},
    **{ord(char): f"\\u{ord(char):04x}" for char in "\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"},
    ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r",
}


def one_line(text: str) -> str:
    """Text a model, a bot's author or a status wrote, on one line of a terminal, shown and not obeyed: a newline
    as \\n, other control characters as their escapes (\\x1b), a backslash doubled so an escape reads as one."""
    return text.translate(_ESCAPES)


def download_plan(manifest_text: bytes, max_bytes: int = DEFAULT_MAX_BYTES, max_files: int = MAX_FILES) -> dict[str, int]:
    """The model's files and their sizes, as its manifest names them; a name that would leave the directory,
    or a model beyond the bounds, is refused before anything is written."""
    try:
        files = json.loads(manifest_text).get("files")
    except (ValueError, AttributeError):
        files = None
    if not isinstance(files, dict):
        raise Refusal(f"the model's {MANIFEST_FILE} names no files")
    if len(files) > max_files:
        raise Refusal(f"the model has {len(files)} files, more than {max_files}")
    plan = {}
    for name, facts in files.items():
        path = PurePosixPath(name)
        if (not name or path.is_absolute() or "\\" in name or any(part in ("", ".", "..") for part in name.split("/"))
                or name in (MANIFEST_FILE, CARD_FILE) or not all(c.isprintable() for c in name)):
            raise Refusal(f"the model's {MANIFEST_FILE} names a file {name!r} that is not a plain relative path")
        size = (facts or {}).get("bytes") if isinstance(facts, dict) else None
        if not isinstance(size, int) or size < 0:
            raise Refusal(f"the model's {MANIFEST_FILE} gives no size for {name!r}")
        plan[name] = size
    total = sum(plan.values())
    if total > max_bytes:
        raise Refusal(f"the model is {total:,} bytes, more than --max-bytes {max_bytes:,}")
    return plan


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "s3" or "hub"
    where: str  # an s3:// URI, or a Hub repo id
    endpoint: str = ""  # the Hub the repo is on, as status.artifacts.hubUrl names it
    anonymous: bool = False  # not the user's Hub: read without the user's token


SOURCES = ("s3", "hub")
HUB = "https://huggingface.co"  # huggingface_hub's endpoint without HF_ENDPOINT


def model_source(bot: dict, wanted: str | None = None, environ: Mapping[str, str] | None = None) -> ModelSource:
    """Where `generate` loads the model from: S3 (the default while there is a model there), or the Hub repo
    of `status.artifacts.hubUrl`, on the host that URL names; anonymously if that is not the user's Hub."""
    artifacts = (bot.get("status") or {}).get("artifacts") or {}
    wanted = wanted or ("s3" if artifacts.get("modelUri") or not artifacts.get("hubUrl") else "hub")
    if wanted == "s3":
        return ModelSource("s3", model_location(bot).uri)
    if not artifacts.get("hubUrl"):
        raise Refusal(f"{bot['metadata']['name']} has no model on the Hub: status.artifacts.hubUrl is empty", Exit.UNAVAILABLE)
    endpoint, repo_id = hub_location(artifacts["hubUrl"])
    return ModelSource("hub", repo_id, endpoint, anonymous=not sends_hub_token(endpoint, environ or {}))


def hub_location(hub_url: str) -> tuple[str, str]:
    """(endpoint, <owner>/<name>) of a Hub URL `<endpoint>/<owner>/<name>`, the endpoint perhaps with a path of its own."""
    try:
        parts = urlsplit(hub_url)
        plain = parts.scheme in ("http", "https") and bool(parts.hostname) and "@" not in parts.netloc
    except ValueError:  # a bracket that opens no IPv6 address
        plain = False
    if not plain or not hub_url.isprintable():
        raise Refusal(f"{hub_url!r} is not a plain http(s) Hub URL")
    segments = [segment for segment in parts.path.split("/") if segment]
    if len(segments) < 2:
        raise Refusal(f"{hub_url!r} names no Hub repository")
    return f"{parts.scheme}://{parts.netloc}" + "".join("/" + segment for segment in segments[:-2]), "/".join(segments[-2:])


def hub_download_bytes(where: str, sizes: Mapping[str, int | None] | None, max_bytes: int = DEFAULT_MAX_BYTES,
                       max_files: int = MAX_FILES) -> int:
    """The bytes of a Hub repo's files, by name as the Hub lists them (model_info with files_metadata) before
    any is downloaded: the whole repo is, so all count. A repo beyond the bounds is refused, and so is one with
    a file the Hub gives no size for: nothing would bound its download."""
    if sizes is None:
        raise Refusal(f"the Hub lists no files of {where}")
    if len(sizes) > max_files:
        raise Refusal(f"{where} has {len(sizes)} files on the Hub, more than {max_files}")
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 0:
            raise Refusal(f"the Hub gives no size for '{one_line(name)}' of {where}")
    total = sum(sizes.values())
    if total > max_bytes:
        raise Refusal(f"{where} is {total:,} bytes on the Hub, more than --max-bytes {max_bytes:,}")
    return total


def _origin(url: str) -> tuple[str, str, int | None] | None:
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:
        return None
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def sends_hub_token(endpoint: str, environ: Mapping[str, str]) -> bool:
    """Whether the user's Hub token may go to `endpoint`: only to the Hub the user configured (HF_ENDPOINT, else
    huggingface.co), the same scheme, host and port. A bot's hubUrl is its author's to choose."""
    mine = _origin((environ.get("HF_ENDPOINT") or HUB).strip())
    return mine is not None and bool(mine[1]) and _origin(endpoint) == mine
