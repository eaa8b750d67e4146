"""What a namespace user can make the operator do with its cluster-wide rights and its own S3 identity
(issue 16's tenant-isolation items): the decisions as plain functions, and the parts the API server and an
HTTP server decide against the real ones."""

from __future__ import annotations

import http.server
import threading
import time

import pytest
from kubernetes.client.rest import ApiException

from tweetbot_operator.kube import Kube, path
from tweetbot_operator.jobs import occupies_training_slot
from tweetbot_operator.plan import Observed, plan
from tweetbot_operator.spec import (
    BOT_IDENTITY,
    OPERATOR_IDENTITY,
    SECRET_OPT_IN_LABEL,
    InvalidSpec,
    SecretView,
    run_id_for,
    s3_identity,
    validate_spec,
)
from tweetbot_operator.stages import job_name
from tweetbot_operator.settings import Settings
from tweetbot_trainer.contract import GROUP, STAGE_LABEL, S3Layout

from test_reconcile import ALL_SECRETS, NOW, SETTINGS, make_bot

TRAVERSAL = "../../kube-system/secrets/aws-creds"


# --- 1. object names ------------------------------------------------------------------------------

def test_object_names_are_escaped_whole_in_api_paths():
    assert path("v1", "secrets", "team-a", TRAVERSAL) == "/api/v1/namespaces/team-a/secrets/..%2F..%2Fkube-system%2Fsecrets%2Faws-creds"
    assert path("batch/v1", "jobs", "a/b") == "/apis/batch/v1/namespaces/a%2Fb/jobs"
    for name in ("", ".", ".."):
        with pytest.raises(ValueError):
            path("v1", "secrets", "team-a", name)


@pytest.mark.parametrize("field", ["x", "hub", "s3"])
def test_the_operator_refuses_names_the_api_server_would_not_accept(field):
    bot = make_bot()
    ref = {"x": bot["spec"]["source"]["x"]["bearerTokenSecretRef"], "hub": bot["spec"]["output"]["hub"]["tokenSecretRef"],
           "s3": bot["spec"]["output"]["s3"]["credentialsSecretRef"]}[field]
    ref["name"] = TRAVERSAL
    decided = plan(bot, Observed(secrets=ALL_SECRETS), SETTINGS, NOW)
    assert decided.create == [] and decided.status["phase"] == "Failed"
    assert "is not a Kubernetes object name (a DNS subdomain)" in decided.status["lastError"]


@pytest.mark.cluster
def test_a_secret_name_cannot_reach_another_namespace(api_client, namespace):
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "aws-creds"}, "stringData": {"k": "v"}})
    kube = Kube(api_client)
    assert kube.get(path("v1", "secrets", namespace, "aws-creds"))["metadata"]["namespace"] == namespace
    with pytest.raises(ApiException) as refused:
        kube.get(path("v1", "secrets", "default", f"../../{namespace}/secrets/aws-creds"))
    assert refused.value.status in (400, 404)


# --- 2. whose identity signs what, and where ------------------------------------------------------

def test_the_operator_uses_its_own_identity_only_in_buckets_the_admin_listed():
    with_secret = make_bot()
    without = make_bot()
    del without["spec"]["output"]["s3"]["credentialsSecretRef"]
    trusting = Settings(s3_operator_buckets=("bots",))
    assert s3_identity(with_secret, SETTINGS) == BOT_IDENTITY
    assert s3_identity(without, SETTINGS) is None
    assert s3_identity(without, trusting) == OPERATOR_IDENTITY
    without["spec"]["deletionPolicy"] = "Delete"
    with pytest.raises(InvalidSpec, match="deletionPolicy Delete needs spec.output.s3.credentialsSecretRef"):
        validate_spec(without, SETTINGS)
    validate_spec(without, trusting)


@pytest.mark.parametrize("s3, message", [
    ({"endpoint": "http://169.254.169.254"}, "is not an S3 endpoint this operator may use (allowed: none: only AWS S3"),
    ({"endpoint": "http://minio.internal:9000/"}, "is not an S3 endpoint this operator may use"),
    ({"region": "x.evil.example/"}, "spec.output.s3.region 'x.evil.example/' must be a region name"),
    ({"bucket": "b/../../other"}, "must be an S3 bucket name"),
])
def test_a_tenant_cannot_point_the_operator_at_a_host_of_its_choosing(s3, message):
    bot = make_bot()
    bot["spec"]["output"]["s3"].update(s3)
    decided = plan(bot, Observed(secrets=ALL_SECRETS), SETTINGS, NOW)
    assert decided.create == [] and message in decided.status["lastError"]


def test_an_allowed_endpoint_is_accepted_with_or_without_a_trailing_slash():
    bot = make_bot()
    bot["spec"]["output"]["s3"]["endpoint"] = "http://minio.internal:9000/"
    validate_spec(bot, Settings(s3_endpoints=("http://minio.internal:9000",)))


class _Hostile(http.server.BaseHTTPRequestHandler):
    """Answers 200 with a body that is endless (slow) or huge."""

    mode = "slow"

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        try:
            if self.mode == "huge":
                self.wfile.write(b"{" + b" " * (50 * 1024 * 1024))
            else:
                for _ in range(600):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.1)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("mode", ["slow", "huge"])
def test_a_progress_read_is_bounded_in_time_and_bytes(mode):
    from tweetbot_operator import artifacts

    handler = type("Handler", (_Hostile,), {"mode": mode})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        layout = S3Layout(bucket="bots", prefix="tweetbot", namespace="ns", bot="b", run_id="r",
                          endpoint=f"http://127.0.0.1:{server.server_port}")
        started = time.monotonic()
        keys = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
        assert artifacts.read_progress(layout, keys) is None
        # The slow server would take a minute; the read gives up at its own deadline.
        assert time.monotonic() - started < artifacts.PROGRESS_SECONDS + 5
    finally:
        server.shutdown()
        server.server_close()


# --- 3. Secrets opt in ----------------------------------------------------------------------------

def test_a_secret_without_the_opt_in_label_is_never_put_into_a_job():
    bot = make_bot()
    secrets = {**ALL_SECRETS, "hf": SecretView(frozenset({"token"}), opted_in=False)}
    jobs, results = [], {}
    for stage in ("scrape", "train"):
        name = job_name(bot, run_id_for(bot), stage)
        jobs.append({"metadata": {"name": name, "labels": {"huggingtweets.dev/run": run_id_for(bot)}}, "spec": {},
                     "status": {"conditions": [{"type": "Complete", "status": "True"}]}})
        from tweetbot_trainer.contract import StageResult
        results[name] = StageResult(stage=stage, run_id=run_id_for(bot))
    decided = plan(bot, Observed(jobs=jobs, results=results, secrets=secrets), SETTINGS, NOW)
    assert decided.create == []
    assert decided.status["lastError"] == (
        f"Secret 'hf' (named by spec.output.hub.tokenSecretRef) is not labelled {SECRET_OPT_IN_LABEL}=true; "
        "label it to let TweetBots use it")


# --- 4. artifact layouts --------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "a/b", "tweetbot/team-b", "..", "/x"])
def test_a_prefix_is_one_key_segment(prefix):
    bot = make_bot()
    bot["spec"]["output"]["s3"]["prefix"] = prefix
    with pytest.raises(InvalidSpec, match="spec.output.s3.prefix"):
        validate_spec(bot, SETTINGS)


def test_no_bots_artifacts_nest_inside_anothers():
    """Every (prefix, namespace, bot) the operator accepts, against every other: neither's key space
    contains the other's (the example that overlapped: prefix 'x' in namespace 'a' and prefix '' in 'x')."""
    names = ["x", "a", "b", "a-b", "x.y"]
    layouts = [S3Layout("bots", prefix, namespace, bot, "run1") for prefix in names for namespace in names for bot in names]
    prefixes = {layout.bot_prefix + "/" for layout in layouts}
    assert len(prefixes) == len(layouts)
    assert not [(a, b) for a in prefixes for b in prefixes if a != b and b.startswith(a)]


def test_every_run_a_bot_starts_is_recorded_for_its_deletion():
    bot = make_bot()
    decided = plan(bot, Observed(secrets=ALL_SECRETS), SETTINGS, NOW)
    first = run_id_for(bot)
    assert decided.status["runs"] == [first]
    bot["status"] = decided.status
    bot["spec"]["training"]["epochs"] = 9
    bot["metadata"]["generation"] = 2
    decided = plan(bot, Observed(secrets=ALL_SECRETS), SETTINGS, NOW)
    assert decided.status["runs"] == [first, run_id_for(bot)]
    bot["status"] = decided.status
    bot["spec"]["output"]["s3"]["prefix"] = "a/b"  # an invalid edit keeps the record
    assert plan(bot, Observed(secrets=ALL_SECRETS), SETTINGS, NOW).status["runs"] == [first, run_id_for(bot)]


# --- 5. training slots ----------------------------------------------------------------------------

def _train_job(owner_kind="TweetBot", suspend=False, conditions=()):
    owners = [] if owner_kind is None else [{"apiVersion": f"{GROUP}/v1alpha1", "kind": owner_kind, "name": "x",
                                             "uid": "u", "controller": True}]
    return {"metadata": {"name": "j", "labels": {STAGE_LABEL: "train"}, "ownerReferences": owners},
            "spec": {"suspend": suspend}, "status": {"conditions": list(conditions), "startTime": "2026-11-22T11:00:00Z"}}


def test_only_admitted_unfinished_train_jobs_of_tweetbots_hold_a_slot():
    assert occupies_training_slot(_train_job())
    assert not occupies_training_slot(_train_job(owner_kind=None))  # a Job that merely carries the label
    assert not occupies_training_slot(_train_job(owner_kind="CronJob"))
    assert not occupies_training_slot(_train_job(suspend=True))  # waiting in a Kueue queue
    assert not occupies_training_slot(_train_job(conditions=[{"type": "Complete", "status": "True"}]))


# --- 6. Jobs the API server refuses -----------------------------------------------------------------

def test_a_job_the_api_server_refuses_stalls_the_bot_with_its_message():
    bot = make_bot()
    name = job_name(bot, run_id_for(bot), "scrape")
    refusal = 'jobs.batch "x" is forbidden: exceeded quota: jobs, requested: count/jobs.batch=1, used: 0, limited: 0'
    decided = plan(bot, Observed(secrets=ALL_SECRETS, rejected={name: refusal}), SETTINGS, NOW)
    assert decided.create == []
    stalled = next(c for c in decided.status["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "JobRejected"
    assert decided.status["lastError"] == f"the API server refused Job {name}: {refusal}"


# --- 14. the operator's Secret cache --------------------------------------------------------------

def test_the_secret_cache_is_bounded():
    from tweetbot_operator.controller import SecretCache

    class Secrets:
        def get(self, path):
            return {"metadata": {"labels": {SECRET_OPT_IN_LABEL: "true"}}, "data": {"token": "c2VjcmV0"}}

    cache = SecretCache(Secrets(), clock=iter(range(10_000)).__next__)
    cache.MAX_SHARED = 100
    for number in range(1000):
        assert cache.view(f"ns-{number}", "x-api").keys == {"token"}
    assert len(cache) <= 100
    assert ("ns-999", "x-api") in cache._shared  # the newest stay


# --- 4. deletion checks every key -----------------------------------------------------------------

@pytest.mark.s3
def test_a_key_s3_would_not_delete_fails_the_deletion_naming_it(dev_env, monkeypatch):
    """MinIO's STS gives credentials that may delete everything but one key; a batch delete then answers 200
    with that key in its Errors, which both the operator's deletion and the stages' must not take as done."""
    import json

    import boto3

    from tweetbot_operator import artifacts
    from tweetbot_trainer.storage import S3Failure, Storage

    admin = dict(endpoint_url=dev_env.s3_endpoint, aws_access_key_id=dev_env.s3_access_key,
                 aws_secret_access_key=dev_env.s3_secret_key, region_name="us-east-1")
    s3 = boto3.client("s3", **admin)
    bucket = "per-key-errors"
    s3.create_bucket(Bucket=bucket)
    layout = S3Layout(bucket, "tweetbot", "ns", "bot", "run1", endpoint=dev_env.s3_endpoint)
    kept = layout.key("data", "dataset.jsonl")
    for key in (kept, layout.key("data", "stats.json")):
        s3.put_object(Bucket=bucket, Key=key, Body=b"{}")
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:*"], "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]},
        {"Effect": "Deny", "Action": ["s3:DeleteObject"], "Resource": [f"arn:aws:s3:::{bucket}/{kept}"]},
    ]}
    credentials = boto3.client("sts", **admin).assume_role(
        RoleArn="arn:minio:iam:::role/no-delete", RoleSessionName="no-delete", Policy=json.dumps(policy), DurationSeconds=900)["Credentials"]
    limited = boto3.client("s3", endpoint_url=dev_env.s3_endpoint, region_name="us-east-1",
                           aws_access_key_id=credentials["AccessKeyId"], aws_secret_access_key=credentials["SecretAccessKey"],
                           aws_session_token=credentials["SessionToken"])
    monkeypatch.setattr(artifacts, "s3_client", lambda layout, credentials: limited)

    with pytest.raises(RuntimeError, match=f"S3 did not delete 1 of 2 objects \\(first: {kept}: AccessDenied\\)"):
        artifacts.delete_artifacts([layout], None, deadline_seconds=60)
    storage = Storage(dev_env.s3_endpoint)
    storage.s3 = limited
    s3.put_object(Bucket=bucket, Key=layout.key("data", "stats.json"), Body=b"{}")
    with pytest.raises(S3Failure, match=f"delete s3://{bucket}/{kept} failed: AccessDenied"):
        storage.delete_prefix(bucket, layout.run_prefix + "/")
    assert [item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"]] == [kept]
