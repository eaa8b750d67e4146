"""`kubectl tweetbot`'s decisions, without a cluster: the table, wait's verdicts, which Job and pods `logs`
reads, the S3 locations and the download's bounds (botview.py); and the download against a local S3 endpoint
that sends more than the manifest says, or drips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tweetbot_operator.botview import (
    Exit,
    Refusal,
    download_plan,
    hub_download_bytes,
    hub_location,
    human_duration,
    logs_target,
    model_location,
    model_source,
    no_pods_message,
    parse_duration,
    pods_to_show,
    rerun_patch,
    rerun_value,
    s3_endpoint,
    sample_lines,
    sends_hub_token,
    still_waiting,
    table,
    wait_verdict,
)
from tweetbot_operator.names import RERUN_ANNOTATION

VERBS = ("get", "wait", "logs", "samples", "generate", "rerun", "download")
NOW = datetime(2026, 12, 3, 12, 0, 0, tzinfo=timezone.utc)
MODEL = "s3://bots/tweetbot/team/dreamer/a1b2c3d4/final/"


def bot(name="dreamer", generation=1, annotations=None, **status) -> dict:
    return {
        "apiVersion": "huggingtweets.dev/v1alpha1", "kind": "TweetBot",
        "metadata": {"name": name, "namespace": "team", "generation": generation, "annotations": annotations or {},
                     "creationTimestamp": "2026-12-03T10:55:00Z", "managedFields": [{"manager": "kubectl"}]},
        "spec": {"handles": ["dreamer"], "output": {"s3": {"bucket": "bots", "endpoint": "http://minio:9000", "region": "eu-west-3"}}},
        "status": status,
    }


def conditions(generation=1, ready=False, stalled=False, reason="TrainRunning", message=""):
    return [{"type": "Ready", "status": str(ready), "reason": reason, "observedGeneration": generation},
            {"type": "Stalled", "status": str(stalled), "reason": reason if stalled else "NotStalled",
             "message": message if stalled else "", "observedGeneration": generation}]


# --- get ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds, shown", [(0, "0s"), (45, "45s"), (119, "119s"), (200, "3m20s"), (300, "5m"),
                                            (95 * 60, "95m"), (5 * 3600 + 600, "5h10m"), (30 * 3600, "30h"),
                                            (3 * 86400 + 4 * 3600, "3d4h"), (12 * 86400, "12d"), (800 * 86400, "2y70d")])
def test_ages_read_as_kubectl_tells_them(seconds, shown):
    assert human_duration(seconds) == shown


def test_a_training_bot_shows_its_progress_eta_and_live_loss():
    training = bot(phase="Training", progress={"summary": "train 40% (40/100 steps)", "etaSeconds": 754, "loss": 3.14159},
                   metrics={"posts": 400})
    text = table([training], NOW)
    header, line = text.splitlines()
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "ETA", "LOSS", "HUB", "AGE"]
    assert line.split() == ["dreamer", "Training", "train_40%_(40/100_steps)", "12m", "3.142", "-", "65m"]
    assert header.index("PHASE") == line.index("Training")  # aligned columns


def test_a_finished_bot_shows_its_eval_loss_and_hub_url_and_no_eta():
    done = bot(phase="Succeeded", progress={"summary": "3/3", "etaSeconds": 0, "loss": 2.5},
               metrics={"evalLoss": 1.23456}, artifacts={"hubUrl": "https://huggingface.co/demo/dreamer", "modelUri": MODEL})
    [_, line] = table([done], NOW).splitlines()
    assert line.split() == ["dreamer", "Succeeded", "3/3", "-", "1.235", "https://huggingface.co/demo/dreamer", "65m"]


def test_a_new_bot_without_status_and_all_namespaces():
    new = bot(name="fresh")
    new.pop("status")
    header, line = table([new], NOW, all_namespaces=True).splitlines()
    assert header.split()[0] == "NAMESPACE" and line.split() == ["team", "fresh", "-", "-", "-", "-", "-", "65m"]


def test_a_cell_cannot_break_the_table():
    sneaky = bot(artifacts={"hubUrl": "https://hub.example/a b\nfake-row\tx"})
    lines = table([sneaky], NOW).splitlines()
    assert len(lines) == 2 and len(lines[1].split()) == 7
    hostile = bot(phase=HOSTILE, progress={"summary": HOSTILE}, artifacts={"hubUrl": HOSTILE})
    assert all(line.isprintable() for line in table([hostile], NOW).splitlines())


# --- wait --------------------------------------------------------------------------------------------------


def test_wait_is_done_when_ready_for_the_current_generation():
    ready = bot(generation=2, phase="Succeeded", observedGeneration=2, runId="a1b2c3", conditions=conditions(2, ready=True),
                artifacts={"modelUri": MODEL})
    verdict = wait_verdict(ready)
    assert verdict.code == Exit.OK == 0 and "Succeeded" in verdict.message and MODEL in verdict.message


def test_wait_goes_on_while_the_status_is_of_an_older_generation_or_rerun():
    old = bot(generation=3, phase="Succeeded", observedGeneration=2, conditions=conditions(2, ready=True))
    assert wait_verdict(old) is None
    stale_condition = bot(generation=3, phase="Succeeded", observedGeneration=3, conditions=conditions(2, ready=True))
    assert wait_verdict(stale_condition) is None
    rerun = bot(annotations={RERUN_ANNOTATION: "2026-12-03T11:00:00Z"}, phase="Succeeded", observedGeneration=1,
                rerun="2026-12-03T10:00:00Z", conditions=conditions(ready=True))
    assert wait_verdict(rerun) is None
    answered = bot(annotations={RERUN_ANNOTATION: "2026-12-03T11:00:00Z"}, phase="Succeeded", observedGeneration=1,
                   rerun="2026-12-03T11:00:00Z", conditions=conditions(ready=True))
    assert wait_verdict(answered).code == Exit.OK
    running = bot(phase="Training", observedGeneration=1, conditions=conditions())
    assert wait_verdict(running) is None
    assert wait_verdict(bot()) is None  # no status yet


def test_wait_ends_on_failed_with_the_last_error():
    failed = bot(phase="Failed", observedGeneration=1, lastError="train: out of GPU memory (exit 21)",
                 conditions=conditions(stalled=True, reason="StageFailed", message="train: out of GPU memory (exit 21)"))
    verdict = wait_verdict(failed)
    assert verdict.code == Exit.FAILED == 3 and "out of GPU memory" in verdict.message


def test_wait_ends_on_stalled_with_its_reason():
    stalled = bot(phase="Pending", observedGeneration=1, lastError="Secret x-api is missing",
                  conditions=conditions(stalled=True, reason="SecretMissing", message="Secret x-api is missing"))
    verdict = wait_verdict(stalled)
    assert verdict.code == Exit.STALLED == 4 and "SecretMissing" in verdict.message and "x-api" in verdict.message


# What a scraped post or a tenant can put into a status (a stage's message quotes its error): shown, not obeyed.
HOSTILE = "\x1b]0;owned\x07\x1b[2J\nfake line\x9b2J \u202eevil"
SHOWN = "\\x1b]0;owned\\x07\\x1b[2J\\nfake line\\x9b2J \\u202eevil"


def shown_escaped(text: str) -> bool:
    return SHOWN in text and text.isprintable()


def test_wait_shows_the_status_texts_escaped():
    failed = bot(phase="Failed", observedGeneration=1, runId=HOSTILE, lastError=HOSTILE, conditions=conditions())
    stalled = bot(phase="Pending", observedGeneration=1, conditions=conditions(stalled=True, reason=HOSTILE, message=HOSTILE))
    ready = bot(phase="Succeeded", observedGeneration=1, conditions=conditions(ready=True), artifacts={"hubUrl": HOSTILE})
    for copy in (failed, stalled, ready):
        assert shown_escaped(wait_verdict(copy).message), wait_verdict(copy).message
    assert shown_escaped(still_waiting(bot(phase=HOSTILE, progress={"summary": HOSTILE})))


def test_the_exit_codes_are_distinct():
    assert len({code.value for code in Exit}) == len(Exit)
    assert Exit.TIMEOUT not in (Exit.OK, Exit.FAILED, Exit.STALLED)


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("1h30m", 5400), ("90s", 90), ("45", 45), ("500ms", 0.5), ("2.5m", 150)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "30x", "1h junk", "-5m"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


# --- rerun -------------------------------------------------------------------------------------------------


def test_rerun_writes_the_utc_time_once_per_value():
    value = rerun_value(NOW)
    assert value == "2026-12-03T12:00:00Z"
    assert rerun_value(NOW, current=value) == "2026-12-03T12:00:00.000000Z"  # the same second: still a new value
    assert rerun_patch(value) == {"metadata": {"annotations": {RERUN_ANNOTATION: value}}}


# --- logs --------------------------------------------------------------------------------------------------


def staged(**stages) -> dict:
    return bot(phase="Training", runId="a1b2c3d4e5", stages=stages)


def test_logs_default_to_the_running_stage_else_the_last():
    running = staged(scrape={"jobName": "dreamer-a1b2c-scrape", "state": "Succeeded"},
                     train={"jobName": "dreamer-a1b2c-train", "state": "Running"})
    target = logs_target(running)
    assert (target.stage, target.job, target.run_id) == ("train", "dreamer-a1b2c-train", "a1b2c3d4e5")
    done = staged(scrape={"jobName": "s", "state": "Succeeded"}, train={"jobName": "t", "state": "Succeeded"},
                  publish={"jobName": "p", "state": "Failed"})
    assert logs_target(done).stage == "publish"
    assert logs_target(done, "scrape").job == "s"


def test_logs_of_a_stage_that_has_not_started():
    with pytest.raises(Refusal) as refused:
        logs_target(staged(scrape={"jobName": "s", "state": "Running"}), "train")
    assert refused.value.code == Exit.UNAVAILABLE and "train stage" in str(refused.value)
    with pytest.raises(Refusal):
        logs_target(bot())


def pod(name, index=None, created="2026-12-03T11:00:00Z"):
    annotations = {} if index is None else {"batch.kubernetes.io/job-completion-index": str(index)}
    return {"metadata": {"name": name, "annotations": annotations, "creationTimestamp": created}}


def test_logs_read_pod_zero_of_a_gang_or_every_pod_and_the_newest_retry():
    pods = [pod("t-1-x", 1), pod("t-0-old", 0, "2026-12-03T11:00:00Z"), pod("t-0-new", 0, "2026-12-03T11:05:00Z")]
    assert [(index, p["metadata"]["name"]) for index, p in pods_to_show(pods)] == [(0, "t-0-new")]
    assert [(index, p["metadata"]["name"]) for index, p in pods_to_show(pods, all_pods=True)] == [(0, "t-0-new"), (1, "t-1-x")]
    assert [p["metadata"]["name"] for _, p in pods_to_show([pod("single")])] == ["single"]  # not Indexed
    assert pods_to_show([]) == []


def test_cleaned_up_pods_say_where_the_model_is():
    finished = staged(train={"jobName": "dreamer-a1b2c-train", "state": "Succeeded"})
    finished["status"]["artifacts"] = {"modelUri": MODEL}
    target = logs_target(finished, "train")
    message = no_pods_message(finished, target, job=None)
    assert message == (f"the train pods of run a1b2c3d4e5 were cleaned up (ttlSecondsAfterFinished); "
                       f"the model is in {MODEL}")
    pending = staged(train={"jobName": "dreamer-a1b2c-train", "state": "Pending"})
    assert "no pod yet" in no_pods_message(pending, logs_target(pending), job={"metadata": {}})


def test_logs_show_the_status_texts_escaped():
    with pytest.raises(Refusal) as refused:
        logs_target(bot(phase=HOSTILE))
    assert shown_escaped(str(refused.value))
    with pytest.raises(Refusal) as refused:
        logs_target(bot(phase=HOSTILE, stages={"scrape": {"jobName": "s"}}), "train")
    assert shown_escaped(str(refused.value))
    ended = bot(runId=HOSTILE, stages={"scrape": {"jobName": HOSTILE, "state": HOSTILE, "message": HOSTILE}},
                artifacts={"datasetUri": HOSTILE, "modelUri": HOSTILE, "hubUrl": HOSTILE})
    for stage in ("scrape", "train", "publish"):
        ended["status"]["stages"][stage] = {"jobName": HOSTILE, "state": "Succeeded", "message": HOSTILE}
        target = logs_target(ended, stage)
        assert shown_escaped(no_pods_message(ended, target, job=None))
    ended["status"]["stages"]["train"]["state"] = HOSTILE
    assert shown_escaped(no_pods_message(ended, logs_target(ended, "train"), job={"metadata": {}}))


def test_the_api_servers_message_is_shown_escaped():
    from kubernetes.client.rest import ApiException

    from tweetbot_operator.kubectl_plugin import _api_message

    refusal = ApiException(status=422, reason="Unprocessable Entity")
    refusal.body = json.dumps({"kind": "Status", "message": HOSTILE})
    assert _api_message(refusal) == SHOWN
    odd = ApiException(status=500, reason=HOSTILE)
    assert shown_escaped(_api_message(odd))


class FakeLog:
    """A pod log response as the Kubernetes client returns it unread (`_preload_content=False`): its lines, then
    the connection breaking if `broken` is an exception."""

    def __init__(self, lines: list[bytes], broken: Exception | None = None):
        self.lines, self.broken, self.released = lines, broken, False

    def stream(self, amount):
        yield from self.lines
        if self.broken is not None:
            raise self.broken

    def release_conn(self):
        self.released = True


def log_cluster(logs: dict[str, FakeLog | Exception]):
    """What `_print_log` uses of a Cluster: the core API's pod log reads, answered from `logs` by pod name."""
    from types import SimpleNamespace

    def read_namespaced_pod_log(name, namespace, **_):
        answer = logs[name]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return SimpleNamespace(namespace="team", core=SimpleNamespace(read_namespaced_pod_log=read_namespaced_pod_log))


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_following_every_pod_fails_with_one_line_when_a_log_breaks_off(capsys):
    from urllib3.exceptions import ProtocolError

    from tweetbot_operator.kubectl_plugin import _follow_all

    broken = FakeLog([b"step 1\n", b"step 2\n"], ProtocolError("Connection broken: IncompleteRead(0 bytes read)"))
    cluster = log_cluster({"t-0": FakeLog([b"rank 0 ok\n"]), "t-1": broken, "t-2": RuntimeError("unforeseen")})
    code = _follow_all(cluster, "train", [(0, pod("t-0", 0)), (1, pod("t-1", 1)), (2, pod("t-2", 2))])
    out, err = capsys.readouterr()
    assert code == Exit.ERROR
    assert sorted(out.splitlines()) == ["[0] rank 0 ok", "[1] step 1", "[1] step 2"]
    assert "Traceback" not in err
    assert err.splitlines() == ["error: the log of pod t-1 broke off: Connection broken: IncompleteRead(0 bytes read)",
                                "error: following the log of pod t-2 failed: RuntimeError: unforeseen"]
    assert broken.released


def test_following_one_pod_fails_with_one_line_when_its_log_breaks_off(capsys):
    from urllib3.exceptions import ProtocolError

    from tweetbot_operator.kubectl_plugin import _print_log

    cluster = log_cluster({"t-0": FakeLog([b"step 1\n"], ProtocolError("Connection broken: IncompleteRead(0 bytes read)"))})
    with pytest.raises(Refusal, match="the log of pod t-0 broke off: Connection broken") as refused:
        _print_log(cluster, pod("t-0"), "train", None, follow=True)
    assert refused.value.code == Exit.ERROR and capsys.readouterr().out == "step 1\n"


# --- S3 ----------------------------------------------------------------------------------------------------


def test_the_model_and_its_samples_are_under_the_model_uri():
    location = model_location(bot(artifacts={"modelUri": MODEL}))
    assert (location.bucket, location.prefix) == ("bots", "tweetbot/team/dreamer/a1b2c3d4/final/")
    assert (location.region, location.endpoint) == ("eu-west-3", "http://minio:9000")
    with pytest.raises(Refusal) as refused:
        model_location(bot(phase="Training"))
    assert refused.value.code == Exit.UNAVAILABLE and "no model yet" in str(refused.value)
    with pytest.raises(Refusal) as refused:
        model_location(bot(phase=HOSTILE))
    assert shown_escaped(str(refused.value))
    # Its bucket and key reach messages and --help's advice: a URI the operator cannot have written is refused.
    with pytest.raises(Refusal, match="not a plain s3:// URI") as refused:
        model_location(bot(artifacts={"modelUri": "s3://bots/team/" + HOSTILE + "/final/"}))
    assert shown_escaped(str(refused.value))


def test_the_s3_endpoint_is_one_the_user_chose_never_the_bots_alone():
    location = model_location(bot(artifacts={"modelUri": MODEL}))
    assert s3_endpoint("http://local:9000", {"AWS_ENDPOINT_URL": "http://env"}, location) == "http://local:9000"
    assert s3_endpoint(None, {"AWS_ENDPOINT_URL": "http://env"}, location) is None  # boto3 reads it itself
    assert s3_endpoint(None, {"AWS_ENDPOINT_URL_S3": "http://env"}, location) is None
    # The spec is the bot author's: the user's credentials would sign requests to a host a tenant chose.
    with pytest.raises(Refusal) as refused:
        s3_endpoint(None, {}, location)
    assert "http://minio:9000" in str(refused.value) and "--s3-endpoint" in str(refused.value)
    on_aws = bot(artifacts={"modelUri": MODEL})
    del on_aws["spec"]["output"]["s3"]["endpoint"]
    assert s3_endpoint(None, {}, model_location(on_aws)) is None  # AWS


def test_samples_print_one_a_line():
    payload = json.dumps(["My dream is a boat", "My dream is\ntwo lines"]).encode()
    assert sample_lines(payload) == ["My dream is a boat", "My dream is\\ntwo lines"]
    with pytest.raises(Refusal):
        sample_lines(b'{"not": "a list"}')


def test_samples_reach_the_terminal_without_control_characters():
    """A model trained on hostile posts can write escape sequences: shown, not obeyed by the terminal."""
    samples = ["\x1b]0;owned\x07\x1b[2J\x1b[31mred\x1b[0m", "tab\tkept, bell\x07, nul\x00, del\x7f", "c1 csi \x9b2J",
               "bidi \u202eevil\u202c and \u2066isolate\u2069", "line\u2028separator", "emoji \U0001f468\u200d\U0001f469 ok",
               "back\\slash\r\n"]
    assert sample_lines(json.dumps(samples).encode()) == [
        "\\x1b]0;owned\\x07\\x1b[2J\\x1b[31mred\\x1b[0m", "tab\tkept, bell\\x07, nul\\x00, del\\x7f", "c1 csi \\x9b2J",
        "bidi \\u202eevil\\u202c and \\u2066isolate\\u2069", "line\\u2028separator", "emoji \U0001f468\u200d\U0001f469 ok",
        "back\\\\slash\\r\\n"]


def test_the_download_follows_the_manifest_within_bounds():
    manifest = {"files": {"config.json": {"bytes": 10}, "model.safetensors": {"bytes": 1000}, "sub/x.txt": {"bytes": 0}}}
    assert download_plan(json.dumps(manifest).encode()) == {"config.json": 10, "model.safetensors": 1000, "sub/x.txt": 0}
    with pytest.raises(Refusal, match="more than --max-bytes"):
        download_plan(json.dumps(manifest).encode(), max_bytes=999)
    with pytest.raises(Refusal, match="more than 2"):
        download_plan(json.dumps(manifest).encode(), max_files=2)
    for bad in ("../escape", "/etc/passwd", "a//b", "a/./b", "a\\b", "manifest.json", ""):
        with pytest.raises(Refusal, match="plain relative path"):
            download_plan(json.dumps({"files": {bad: {"bytes": 1}}}).encode())
    with pytest.raises(Refusal):
        download_plan(b"not json")


def test_generate_loads_from_s3_by_default_else_from_the_hub_repo_on_its_own_host():
    both = bot(artifacts={"modelUri": MODEL, "hubUrl": "https://huggingface.co/demo/dreamer"})
    assert model_source(both).kind == "s3" and model_source(both).where == MODEL
    hub = model_source(both, "hub")
    assert (hub.where, hub.endpoint, hub.anonymous) == ("demo/dreamer", "https://huggingface.co", False)
    # Published to the bot's own Hub endpoint: loaded from there, not from a same-named repo elsewhere.
    hub_only = bot(artifacts={"hubUrl": "http://127.0.0.1:8080/hub/demo/dreamer"})
    hub = model_source(hub_only)
    assert (hub.kind, hub.where, hub.endpoint, hub.anonymous) == ("hub", "demo/dreamer", "http://127.0.0.1:8080/hub", True)
    assert model_source(hub_only, environ={"HF_ENDPOINT": "http://127.0.0.1:8080/"}).anonymous is False
    with pytest.raises(Refusal):
        model_source(bot(artifacts={"modelUri": MODEL}), "hub")
    for odd in ("file:///etc/demo/dreamer", "https://hub.example\x1b[2J/demo/dreamer", "https://me@hub.example/demo/dreamer"):
        with pytest.raises(Refusal, match="not a plain http"):
            model_source(bot(artifacts={"hubUrl": odd}))
    assert hub_location("https://huggingface.co/org/name/") == ("https://huggingface.co", "org/name")


@pytest.mark.parametrize("endpoint, environ, sent", [
    ("https://huggingface.co", {}, True),
    ("https://HuggingFace.co:443", {}, True),
    ("https://hub.example", {}, False),
    ("http://huggingface.co", {}, False),  # in clear text
    ("https://huggingface.co.example", {}, False),
    ("https://huggingface.co@hub.example", {}, False),
    ("https://huggingface.co:8443", {}, False),
    ("http://hub.local:8080/mirror", {"HF_ENDPOINT": "http://hub.local:8080"}, True),
    ("http://hub.local:8080", {"HF_ENDPOINT": "http://hub.local:8080/"}, True),
    ("http://hub.local:8081", {"HF_ENDPOINT": "http://hub.local:8080"}, False),
    ("https://huggingface.co", {"HF_ENDPOINT": "http://hub.local:8080"}, False),
])
def test_the_hub_token_goes_only_to_the_hub_the_user_configured(endpoint, environ, sent):
    assert sends_hub_token(endpoint, environ) is sent


class FakeS3:
    """A local S3 endpoint answering path-style GET and HEAD of objects as S3 does (NoSuchKey for a missing one),
    counting the bytes it sent of each. An object in `dripping` is sent a byte every 0.1 s."""

    def __init__(self):
        self.objects: dict[str, bytes] = {}  # "bucket/key" -> bytes
        self.dripping: set[str] = set()
        self.sent: dict[str, int] = {}
        self.done = threading.Event()  # set when an answer ended, sent whole or hung up on
        self.stopped = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                key = unquote(urlsplit(self.path).path).lstrip("/")
                data = fake.objects.get(key)
                if data is None:
                    error = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey</Code>'
                             b"<Message>The specified key does not exist.</Message></Error>")
                    self.send_response(404)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(error)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(error)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                step, pause = (1, 0.1) if key in fake.dripping else (64 * 1024, 0)
                fake.sent.setdefault(key, 0)
                try:
                    for start in range(0, len(data), step):
                        if pause and fake.stopped.wait(pause):
                            return
                        self.wfile.write(data[start:start + step])
                        fake.sent[key] += len(data[start:start + step])
                except OSError:
                    pass
                finally:
                    fake.done.set()

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def put_model(self, prefix: str, files: dict[str, bytes], sizes: dict[str, int] | None = None) -> None:
        """A final model: its files, and the manifest naming them (with `sizes` where it says otherwise)."""
        for name, data in files.items():
            self.objects[prefix + name] = data
        manifest = {"files": {name: {"bytes": (sizes or {}).get(name, len(data))} for name, data in files.items()}}
        self.objects[prefix + "manifest.json"] = json.dumps(manifest).encode()

    def __enter__(self):
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def fake_s3(monkeypatch, tmp_path):
    """A FakeS3, and the AWS chain's variables a user's shell would have, none naming an endpoint."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"AWS_ACCESS_KEY_ID": "reader", "AWS_SECRET_ACCESS_KEY": "reader-secret",
                        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}.items():
        monkeypatch.setenv(name, value)
    with FakeS3() as server:
        yield server


FINAL = "bots/tweetbot/team/dreamer/a1b2c3d4/final/"


def downloads(tmp_path):
    """Where the download tests write: a directory of its own, so what is left beside DIR can be listed."""
    where = tmp_path / "downloads"
    where.mkdir()
    return where


def test_a_download_stops_once_more_bytes_arrive_than_the_manifest_says(fake_s3, tmp_path):
    from tweetbot_operator.kubectl_plugin import download_model

    big = 64 * 1024 * 1024
    fake_s3.put_model(FINAL, {"config.json": b"{}", "model.safetensors": b"x" * big}, sizes={"model.safetensors": 1000})
    where = downloads(tmp_path)
    with pytest.raises(Refusal, match="more than the 1,000 bytes its manifest says") as refused:
        download_model(model_location(bot(artifacts={"modelUri": "s3://" + FINAL})), where / "model", fake_s3.url,
                       10**9)
    assert refused.value.code == Exit.ERROR
    assert fake_s3.done.wait(10)
    # Stopped after a chunk or two: the rest is what the sockets' buffers held when the reader hung up.
    assert fake_s3.sent[FINAL + "model.safetensors"] < big // 4
    assert list(where.iterdir()) == []


def test_a_download_ends_at_its_deadline(fake_s3, tmp_path):
    from tweetbot_operator.kubectl_plugin import download_model

    fake_s3.put_model(FINAL, {"config.json": b"{}", "model.safetensors": b"x" * 1000})
    fake_s3.dripping.add(FINAL + "model.safetensors")  # 100 s at a byte every 0.1 s
    where = downloads(tmp_path)
    started = time.monotonic()
    with pytest.raises(Refusal) as refused:
        download_model(model_location(bot(artifacts={"modelUri": "s3://" + FINAL})), where / "model", fake_s3.url,
                       10**9, timeout=2)
    took = time.monotonic() - started
    assert refused.value.code == Exit.TIMEOUT and took < 5, took
    assert "--timeout" in str(refused.value) and "model.safetensors" in str(refused.value)
    assert list(where.iterdir()) == []


def test_a_download_never_deletes_what_it_did_not_create(fake_s3, tmp_path):
    from tweetbot_operator.kubectl_plugin import download_model

    fake_s3.put_model(FINAL, {"config.json": b'{"model_type": "gpt2"}', "model.safetensors": b"weights"})
    location = model_location(bot(artifacts={"modelUri": "s3://" + FINAL}))
    where = downloads(tmp_path)
    # The user's own files, named as the directories the download once used beside DIR.
    for sibling in ("model.partial", "model.replaced"):
        (where / sibling).mkdir()
        (where / sibling / "mine.txt").write_text("keep me")
    theirs = {path.relative_to(where): path.read_text() for path in where.rglob("*") if path.is_file()}

    def left() -> set[str]:
        return {path.name for path in where.iterdir()}

    assert download_model(location, where / "model", fake_s3.url, 10**9) == {"config.json": 22, "model.safetensors": 7}
    assert left() == {"model", "model.partial", "model.replaced"}
    (where / "model" / "stale.txt").write_text("old")
    download_model(location, where / "model", fake_s3.url, 10**9, force=True)
    assert not (where / "model" / "stale.txt").exists() and (where / "model" / "model.safetensors").read_bytes() == b"weights"
    assert left() == {"model", "model.partial", "model.replaced"}
    del fake_s3.objects[FINAL + "model.safetensors"]  # a failed download leaves nothing of its own behind
    with pytest.raises(Refusal):
        download_model(location, where / "other", fake_s3.url, 10**9)
    assert left() == {"model", "model.partial", "model.replaced"}
    assert {path.relative_to(where): path.read_text() for path in where.rglob("*") if path.is_file()
            and path.parts[len(where.parts)] != "model"} == theirs


# --- the Hub ------------------------------------------------------------------------------------------------


def test_a_hub_repo_is_bounded_by_the_sizes_the_hub_gives_before_any_download():
    sizes = {"config.json": 10, "model.safetensors": 1000}
    assert hub_download_bytes("http://hub/o/n", sizes, max_bytes=1010) == 1010
    with pytest.raises(Refusal, match="http://hub/o/n is 1,010 bytes on the Hub, more than --max-bytes 1,009"):
        hub_download_bytes("http://hub/o/n", sizes, max_bytes=1009)
    with pytest.raises(Refusal, match="more than 1"):
        hub_download_bytes("http://hub/o/n", sizes, max_bytes=10**9, max_files=1)
    # A Hub that does not tell (files_metadata unanswered): a download nothing bounds is not started.
    with pytest.raises(Refusal, match="gives no size for 'model.safetensors'"):
        hub_download_bytes("http://hub/o/n", {"config.json": 10, "model.safetensors": None}, max_bytes=10**9)
    with pytest.raises(Refusal, match="lists no files"):
        hub_download_bytes("http://hub/o/n", None, max_bytes=10**9)


REPO_FILES = {"config.json": b'{"model_type": "gpt2"}', "model.safetensors": b"w" * 1000, "README.md": b"# dreamer"}


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A FakeHub holding the public repo tweetbots/dreamer and the private tweetbots/secret, both of REPO_FILES,
    and a user's environment whose own Hub is huggingface.co, with a token that Hub never sees; the Hugging
    Face cache under tmp_path."""
    import hashlib

    from tweetbot_dev.fake_hub import FakeCommit, FakeHub, FakeRepo

    for name, value in {"HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "hf_mine", "HF_HUB_DISABLE_XET": "1",
                        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_ENDPOINT", "HF_HUB_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with FakeHub(tokens={"hf_mine": "alice"}, orgs={"alice": ["tweetbots"]}) as hub:
        for repo_id, private in (("tweetbots/dreamer", False), ("tweetbots/secret", True)):
            commit = FakeCommit(hashlib.sha1(repo_id.encode()).hexdigest(), "Publish", "", dict(REPO_FILES))
            hub.repos[repo_id] = FakeRepo(repo_id, private, [commit], {"main": commit.id})
        yield hub


def hub_source(hub, repo="tweetbots/dreamer", environ=None):
    return model_source(bot(artifacts={"hubUrl": f"{hub.url}/{repo}"}), "hub", environ or {})


def test_generate_from_another_hub_refuses_beyond_max_bytes_before_downloading(fake_hub, tmp_path, capsys):
    from tweetbot_operator.kubectl_plugin import _hub_snapshot

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    total = sum(len(data) for data in REPO_FILES.values())
    with pytest.raises(Refusal, match=f"more than --max-bytes {total - 1:,}") as refused:
        _hub_snapshot(hub_source(fake_hub), scratch, max_bytes=total - 1, timeout=60)
    assert refused.value.code == Exit.ERROR
    assert fake_hub.downloads == [] and list(scratch.iterdir()) == []
    assert any("blobs=" in request for request in fake_hub.requests), fake_hub.requests

    snapshot = Path(_hub_snapshot(hub_source(fake_hub), scratch, max_bytes=total, timeout=60))
    assert {path.name: path.read_bytes() for path in snapshot.iterdir()} == REPO_FILES
    # The commit whose sizes were read, not what main is by the time the download starts.
    assert snapshot.name == fake_hub.repos["tweetbots/dreamer"].head.id and snapshot.is_relative_to(scratch)
    assert fake_hub.callers and all(user is None for user, _ in fake_hub.callers)  # anonymous: not the user's Hub
    assert "is not your Hub" in capsys.readouterr().err
    assert not (tmp_path / "hf-home" / "hub").exists()  # nothing in the user's cache


def test_generate_from_the_hub_ends_at_its_deadline(fake_hub, tmp_path):
    import multiprocessing

    from tweetbot_operator.kubectl_plugin import _hub_snapshot

    fake_hub.dripping.add("tweetbots/dreamer/model.safetensors")  # 100 s at a byte every 0.1 s
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    started = time.monotonic()
    with pytest.raises(Refusal) as refused:
        _hub_snapshot(hub_source(fake_hub), scratch, max_bytes=10**9, timeout=4)
    took = time.monotonic() - started
    assert refused.value.code == Exit.TIMEOUT and took < 8, took
    assert str(refused.value) == f"reading {fake_hub.url}/tweetbots/dreamer did not end within --timeout (4s)"
    assert any(path.endswith("model.safetensors") for path in fake_hub.downloads)  # it was under way
    assert list(scratch.iterdir()) == [] and multiprocessing.active_children() == []


def test_a_hub_that_fails_is_told_in_one_line(fake_hub, tmp_path, capfd):
    """What fails in the download's process reaches the user as a refusal, not as that process's traceback."""
    import socket

    from tweetbot_operator.kubectl_plugin import _hub_snapshot

    fake_hub.failing = 500
    with pytest.raises(Refusal, match=f"reading tweetbots/dreamer from {fake_hub.url} failed: 500$") as refused:
        _hub_snapshot(hub_source(fake_hub), tmp_path, max_bytes=10**9, timeout=60)
    assert refused.value.code == Exit.ERROR
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{unused.getsockname()[1]}"  # bound, never listening: connections are refused
        source = model_source(bot(artifacts={"hubUrl": f"{closed}/tweetbots/dreamer"}), "hub", {})
        with pytest.raises(Refusal, match=f"reading tweetbots/dreamer from {closed} failed: ConnectError: ") as refused:
            _hub_snapshot(source, tmp_path, max_bytes=10**9, timeout=60)
    assert refused.value.code == Exit.ERROR and "Traceback" not in capfd.readouterr().err


def test_generate_from_the_users_hub_reads_sizes_and_files_with_the_users_token(fake_hub, tmp_path, monkeypatch):
    from tweetbot_operator.kubectl_plugin import _hub_snapshot

    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    source = hub_source(fake_hub, "tweetbots/secret", {"HF_ENDPOINT": fake_hub.url})
    assert not source.anonymous
    with pytest.raises(Refusal, match="more than --max-bytes"):
        _hub_snapshot(source, scratch, max_bytes=10, timeout=60)  # the private repo's sizes: read with the token
    snapshot = Path(_hub_snapshot(source, scratch, max_bytes=10**9, timeout=60))
    assert {path.name: path.read_bytes() for path in snapshot.iterdir()} == REPO_FILES
    assert snapshot.is_relative_to(tmp_path / "hf-home" / "hub") and list(scratch.iterdir()) == []  # the user's cache
    assert fake_hub.callers and all(user == "alice" for user, _ in fake_hub.callers), fake_hub.callers


def test_the_timestamps_are_utc():
    paris = NOW.astimezone(timezone(timedelta(hours=1)))
    assert rerun_value(paris) == "2026-12-03T12:00:00Z"


# --- the command line --------------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_with_the_connection_flags(verb):
    """As kubectl runs the plugin: a process of its own."""
    shown = subprocess.run([sys.executable, "-m", "tweetbot_operator.kubectl_plugin", verb, "--help"], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert f"kubectl tweetbot {verb}" in shown.stdout
    for flag in ("--namespace", "--kubeconfig", "--context", "exit codes: 0 ok"):
        assert flag in shown.stdout


def test_the_verbs_are_the_parsers():
    from tweetbot_operator.kubectl_plugin import build_parser

    choices = next(action for action in build_parser()._subparsers._group_actions).choices
    assert tuple(choices) == VERBS


def test_the_transfer_timeout_reads_as_a_duration():
    from tweetbot_operator.kubectl_plugin import build_parser

    parser = build_parser()
    assert parser.parse_args(["download", "dreamer", "model", "--timeout", "90s"]).timeout == 90
    assert parser.parse_args(["download", "dreamer", "model"]).timeout == 3600
    assert parser.parse_args(["samples", "dreamer"]).timeout == 120
    with pytest.raises(SystemExit) as refused:
        parser.parse_args(["generate", "dreamer", "--timeout", "soon"])
    assert refused.value.code == Exit.USAGE
