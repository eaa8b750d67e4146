"""The operator's pure core and the operator/trainer contract, without a cluster."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from tweetbot_operator.jobs import admission_message, job_fingerprint, job_state
from tweetbot_operator.plan import Observed, plan, status_patch
from tweetbot_operator.spec import (RERUN_ANNOTATION, InvalidSpec, SecretView, normalize_handles, run_id_for,
                                    validate_spec, with_defaults)
from tweetbot_operator.stages import (KUEUE_PRIORITY_LABEL, KUEUE_QUEUE_LABEL, Lineage, desired_job, job_name,
                                      why_no_model_cache)
from tweetbot_operator.settings import Settings, SettingsError
from tweetbot_trainer.contract import (
    HUB_PUSH_TOKEN_ENV,
    MAX_HANDLES,
    MODEL_CACHE_PATH,
    RUN_LABEL,
    STAGES,
    ContractError,
    HandleStats,
    Progress,
    StageRequest,
    StageResult,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
SETTINGS = Settings(trainer_image="trainer:test")


def make_bot(**spec_changes) -> dict:
    spec = {
        "handles": ["@PurefulSoul", "turtlebreezee"],
        "source": {"x": {"bearerTokenSecretRef": {"name": "x-api", "key": "token"}}, "maxPostsPerHandle": 3200},
        "output": {
            "s3": {"bucket": "bots", "prefix": "tweetbot", "credentialsSecretRef": {"name": "s3-creds"}},
            "hub": {"tokenSecretRef": {"name": "hf", "key": "token"}, "private": False},
        },
        "training": {"epochs": 4, "learningRate": 1.372e-4},
        "resources": {"gpus": 2, "cpu": "8", "memory": "32Gi"},
        "backoffLimit": 2,
        "suspend": False,
    }
    spec.update(spec_changes)
    return {
        "apiVersion": "huggingtweets.dev/v1alpha1",
        "kind": "TweetBot",
        "metadata": {"name": "cyborg", "namespace": "bots", "uid": "uid-1", "generation": 1},
        "spec": spec,
    }


def secret(*keys: str, opted_in: bool = True) -> SecretView:
    return SecretView(frozenset(keys), opted_in)


ALL_SECRETS = {"x-api": secret("token"), "hf": secret("token"), "s3-creds": secret("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}


def job(bot, stage, state, failed=0, run_id=None):
    run_id = run_id or run_id_for(bot)
    conditions = {"Succeeded": [{"type": "Complete", "status": "True"}],
                  "Failed": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                              "message": "Job has reached the specified backoff limit"}]}.get(state, [])
    return {
        "metadata": {"name": job_name(bot, run_id, stage), "labels": {RUN_LABEL: run_id}},
        "spec": {},
        "status": {"conditions": conditions, "active": 1 if state == "Running" else 0, "failed": failed,
                   "startTime": "2026-11-22T11:00:00Z",
                   **({"completionTime": "2026-11-22T11:30:00Z"} if state == "Succeeded" else {})},
    }


def result(bot, stage, **fields):
    return StageResult(stage=stage, run_id=run_id_for(bot), **fields)


def settle(bot, observed, settings=SETTINGS, now=NOW):
    """Plan as the controller does: what the plan asks for and the test did not give reads as nothing there
    (no result, no report, no other training, no such Secret)."""
    for _ in range(5):
        decided = plan(bot, observed, settings, now)
        if not decided.needs:
            return decided
        needs = decided.needs
        observed = replace(
            observed,
            results={**dict.fromkeys(needs.results), **observed.results},
            secrets={**dict.fromkeys(needs.secrets), **observed.secrets},
            progress=None if needs.progress else observed.progress,
            other_active_trainings=0 if needs.training_slots else observed.other_active_trainings,
            admission={**dict.fromkeys(needs.admission), **observed.admission},
        )
    raise AssertionError(f"the plan keeps asking for {decided.needs}")


def step(bot, observed):
    """Apply a plan's status to the bot, as the API server would."""
    decided = settle(bot, observed)
    bot = copy.deepcopy(bot)
    bot["status"] = {k: v for k, v in decided.status.items() if v is not None}
    return decided, bot


def condition(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


# --- handles and runs -----------------------------------------------------------------------------

def test_handles_are_normalised_and_checked():
    assert normalize_handles(["@PurefulSoul", " turtlebreezee "]) == ["purefulsoul", "turtlebreezee"]
    with pytest.raises(InvalidSpec, match="alice more than once"):
        normalize_handles(["Alice", "@alice"])
    with pytest.raises(InvalidSpec, match="1 to 3"):
        normalize_handles(["a", "b", "c", "d"])


def test_handle_limit_matches_the_crd():
    crd = yaml.safe_load((Path(__file__).parents[1] / "crds/huggingtweets.dev_tweetbots.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert schema["properties"]["spec"]["properties"]["handles"]["maxItems"] == MAX_HANDLES


def test_run_id_survives_suspend_and_changes_on_edits():
    bot = make_bot()
    first = run_id_for(bot)
    assert run_id_for(make_bot(suspend=True)) == first
    assert run_id_for(make_bot(training={"epochs": 5, "learningRate": 1.372e-4})) != first
    other_uid = make_bot()
    other_uid["metadata"]["uid"] = "uid-2"
    assert run_id_for(other_uid) != first  # a re-created bot of the same name never reuses artifacts
    # While the generation is already observed, the recorded run stands even if defaults change the spec.
    bot["status"] = {"runId": "abc123", "observedGeneration": 1}
    bot["spec"]["newlyDefaulted"] = True
    assert run_id_for(bot) == "abc123"


# What each kind of edit does to the run: (field, new value, whether it starts a new run).
EDITS = [
    ("handles", ["@PurefulSoul"], True),
    ("source", {"x": {"bearerTokenSecretRef": {"name": "other", "key": "token"}}}, True),
    ("data", {"minWords": 5}, True),
    ("model", {"name": "Qwen/Qwen2.5-0.5B"}, True),
    ("training", {"epochs": 5}, True),
    ("output", {"s3": {"bucket": "other-bots"}}, True),
    ("output.hub", {"tokenSecretRef": {"name": "hf", "key": "token"}, "repoId": "org/other"}, False),
    ("suspend", True, False),
    ("backoffLimit", 5, False),
    ("activeDeadlineSeconds", 3600, False),
    ("ttlSecondsAfterFinished", 60, False),
    ("deletionPolicy", "Delete", False),
    ("resources", {"gpus": 4, "memory": "64Gi"}, False),
    # Where and how the pods run, even the image and the kind of GPU: like the chart's trainer image, they
    # apply to the run's next Jobs (the rerun annotation trains again with them).
    ("podOverrides.train.image", "registry.example/trainer:patched", False),
    ("podOverrides.train.gpuResourceName", "nvidia.com/mig-1g.10gb", False),
    ("podOverrides.train.env", [{"name": "NCCL_DEBUG", "value": "INFO"}], False),
    ("podOverrides.scrape.runtimeClassName", "gvisor", False),
]


@pytest.mark.parametrize("field,value,new_run", EDITS, ids=[edit[0] for edit in EDITS])
def test_what_the_model_is_made_of_starts_a_new_run_and_run_control_does_not(field, value, new_run):
    bot = make_bot()
    bot["status"] = {"runId": run_id_for(bot), "observedGeneration": 1}
    *parents, last = field.split(".")
    target = bot["spec"]
    for key in parents:
        target = target.setdefault(key, {})
    target[last] = value
    bot["metadata"]["generation"] = 2
    assert (run_id_for(bot) != bot["status"]["runId"]) is new_run


def finished(bot):
    """The bot after all three stages succeeded, with their Jobs."""
    jobs = [job(bot, stage, "Succeeded") for stage in STAGES]
    results = {jobs[0]["metadata"]["name"]: result(bot, "scrape", artifacts={"datasetUri": "s3://bots/d.jsonl"}),
               jobs[1]["metadata"]["name"]: result(bot, "train", metrics={"evalLoss": 2.5}),
               jobs[2]["metadata"]["name"]: result(bot, "publish", artifacts={"hubUrl": "https://hf.co/o/b", "hubCommit": "c0ffee"})}
    _, bot = step(bot, Observed(jobs=jobs, results=results, secrets=ALL_SECRETS))
    assert bot["status"]["phase"] == "Succeeded"
    return bot, jobs


def test_an_output_hub_edit_re_runs_publish_alone_on_the_same_model():
    bot, jobs = finished(make_bot())
    run = bot["status"]["runId"]
    bot["spec"]["output"]["hub"] = {"tokenSecretRef": {"name": "hf", "key": "token"}, "repoId": "org/other"}
    bot["metadata"]["generation"] = 2
    decided, bot = step(bot, Observed(jobs=jobs, secrets=ALL_SECRETS))
    republish = job_name(bot, run, "publish")
    assert republish != jobs[2]["metadata"]["name"]
    assert [m["metadata"]["name"] for m in decided.create] == [republish]
    assert json.loads(decided.create[0]["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"])["hub"]["repoId"] == "org/other"
    assert decided.delete == [jobs[2]["metadata"]["name"]]  # the superseded publish Job; scrape and train stay
    assert bot["status"]["runId"] == run and bot["status"]["phase"] == "Publishing"
    assert bot["status"]["stages"]["train"]["jobName"] == jobs[1]["metadata"]["name"]

    # Published again without a Hub: the old Hub URL and commit are withdrawn, the rest stays.
    bot["spec"]["output"].pop("hub")
    bot["metadata"]["generation"] = 3
    again = job(bot, "publish", "Succeeded")
    decided, bot = step(bot, Observed(jobs=[*jobs[:2], again], secrets=ALL_SECRETS, results={
        again["metadata"]["name"]: result(bot, "publish", artifacts={"modelUri": "s3://bots/final/", "hubUrl": "", "hubCommit": ""})}))
    assert decided.create == [] and bot["status"]["phase"] == "Succeeded" and bot["status"]["runId"] == run
    assert bot["status"]["artifacts"] == {"datasetUri": "s3://bots/d.jsonl", "modelUri": "s3://bots/final/"}


def test_a_publish_job_named_by_an_earlier_operator_is_kept_until_the_spec_changes():
    bot, jobs = finished(make_bot())
    legacy = f"cyborg-{bot['status']['runId'][:5]}-publish"
    bot["status"]["stages"]["publish"]["jobName"] = legacy
    jobs[2]["metadata"]["name"] = legacy
    decided, _ = step(bot, Observed(jobs=jobs, secrets=ALL_SECRETS))
    assert decided.create == [] and decided.delete == [] and decided.status["phase"] == "Succeeded"
    bot["metadata"]["generation"] = 2  # an edit, of whatever: published again, under the new name
    decided, _ = step(bot, Observed(jobs=jobs, secrets=ALL_SECRETS))
    assert [m["metadata"]["name"] for m in decided.create] == [job_name(bot, bot["status"]["runId"], "publish")]
    assert decided.delete == [legacy]


def test_the_rerun_annotation_starts_a_new_run_once_per_value():
    bot = make_bot()
    first = run_id_for(bot)
    bot["status"] = {"runId": first, "observedGeneration": 1}
    bot["metadata"]["annotations"] = {RERUN_ANNOTATION: "2026-12-03T10:00:00Z"}  # no new generation
    second = run_id_for(bot)
    assert second != first
    bot["status"] = {"runId": second, "observedGeneration": 1, "rerun": "2026-12-03T10:00:00Z"}
    assert run_id_for(bot) == second  # answered: the same value asks for nothing more
    bot["metadata"]["annotations"][RERUN_ANNOTATION] = "again"
    assert run_id_for(bot) not in (first, second)
    decided, _ = step(bot, Observed(jobs=[], secrets=ALL_SECRETS))
    assert decided.status["rerun"] == "again"


# --- spec -> Job ----------------------------------------------------------------------------------

def test_only_the_train_job_asks_for_gpus_and_tolerates_gpu_nodes():
    bot = make_bot(resources={"gpus": 2, "cpu": "8", "memory": "32Gi", "queueName": "team-a",
                              "nodeSelector": {"pool": "a100"}})
    run = run_id_for(bot)
    train = desired_job(bot, run, "train", SETTINGS)
    container = train["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in train["spec"]["template"]["spec"]["tolerations"]
    assert train["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "a100"}
    assert train["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
    assert train["spec"]["suspend"] is True  # Kueue admits it
    for stage in ("scrape", "publish"):
        manifest = desired_job(bot, run, stage, SETTINGS)
        pod = manifest["spec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in json.dumps(pod["containers"][0]["resources"])
        assert "tolerations" not in pod and "nodeSelector" not in pod
        assert manifest["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"


def test_a_bots_kueue_labels_reach_its_jobs_and_queue_them():
    bot = make_bot()
    bot["metadata"]["labels"] = {KUEUE_QUEUE_LABEL: "team-b", KUEUE_PRIORITY_LABEL: "research", "team": "b"}
    run = run_id_for(bot)
    for stage in STAGES:
        manifest = desired_job(bot, run, stage, SETTINGS)
        for labels in (manifest["metadata"]["labels"], manifest["spec"]["template"]["metadata"]["labels"]):
            assert labels[KUEUE_QUEUE_LABEL] == "team-b" and labels[KUEUE_PRIORITY_LABEL] == "research"
            assert "team" not in labels  # the bot's other labels stay on the bot
        assert manifest["spec"]["suspend"] is True  # Kueue admits it
    bot["spec"]["resources"]["queueName"] = "team-a"  # the spec's queue wins over the bot's label
    assert desired_job(bot, run, "train", SETTINGS)["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
    bot["spec"]["resources"].pop("queueName")
    bot["metadata"]["labels"] = {KUEUE_PRIORITY_LABEL: "research"}  # a priority alone queues nothing
    manifest = desired_job(bot, run, "train", SETTINGS)
    assert KUEUE_QUEUE_LABEL not in manifest["metadata"]["labels"] and "suspend" not in manifest["spec"]
    assert manifest["metadata"]["labels"][KUEUE_PRIORITY_LABEL] == "research"


OVERRIDES = {
    "train": {
        "env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "HF_HUB_ENABLE_HF_TRANSFER", "value": "1"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}]}]}}},
        "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
        "labels": {"cost-center": "research"},
        "imagePullSecrets": [{"name": "registry"}],
        "runtimeClassName": "nvidia",
    },
    "scrape": {"runtimeClassName": "gvisor", "env": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]},
}


def test_pod_overrides_reach_their_stages_pods_only():
    bot = make_bot(podOverrides=OVERRIDES)
    validate_spec(bot, SETTINGS)
    run = run_id_for(bot)
    pods = {stage: desired_job(bot, run, stage, SETTINGS)["spec"]["template"] for stage in STAGES}
    train = pods["train"]
    env = train["spec"]["containers"][0]["env"]
    assert env[-2:] == OVERRIDES["train"]["env"]  # after the operator's own
    assert {"name": "OMP_NUM_THREADS", "value": "4"} in env
    assert train["spec"]["affinity"] == OVERRIDES["train"]["affinity"]
    assert train["metadata"]["annotations"] == OVERRIDES["train"]["annotations"]
    assert train["metadata"]["labels"]["cost-center"] == "research"
    assert train["metadata"]["labels"]["huggingtweets.dev/stage"] == "train"
    assert train["spec"]["imagePullSecrets"] == [{"name": "registry"}]
    assert train["spec"]["runtimeClassName"] == "nvidia"
    assert train["spec"]["containers"][0]["image"] == "trainer:test"
    scrape = pods["scrape"]
    assert scrape["spec"]["runtimeClassName"] == "gvisor"
    assert scrape["spec"]["containers"][0]["env"][-1] == {"name": "HTTPS_PROXY", "value": "http://proxy:3128"}
    assert "affinity" not in scrape["spec"] and "annotations" not in scrape["metadata"]
    publish = pods["publish"]
    assert not {"affinity", "imagePullSecrets", "runtimeClassName"} & set(publish["spec"])
    assert "HTTPS_PROXY" not in json.dumps(publish) and "cost-center" not in publish["metadata"]["labels"]


def kubelet_expand(value: str, defined: dict[str, str]) -> str:
    """What the kubelet makes of an env value (Kubernetes' expansion package): `$$` is `$`, `$(NAME)` the value of
    a variable defined before it, anything else stays."""
    out, i = [], 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("$(", i) and ")" in value[i:]:
            end = value.index(")", i)
            name = value[i + 2:end]
            out.append(defined.get(name, value[i:end + 1]))
            i = end + 1
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


@pytest.mark.parametrize("value", ["$(X_BEARER_TOKEN)", "http://$(AWS_SECRET_ACCESS_KEY)@proxy.example:3128", "a$b$$c",
                                   "$", "$$(X_BEARER_TOKEN)", "plain"])
def test_override_env_values_reach_the_container_as_written(value):
    """The kubelet expands $(NAME) in a value from the variables before it, and the Secrets' come first: a tag or
    a proxy URL could otherwise carry a token the author may not read to a host of theirs."""
    bot = make_bot(podOverrides={"scrape": {"env": [{"name": "HTTPS_PROXY", "value": value}]}})
    container = desired_job(bot, run_id_for(bot), "scrape", SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    secrets = {item["name"]: "secret" for item in container["env"] if "valueFrom" in item}
    assert {"X_BEARER_TOKEN", "AWS_SECRET_ACCESS_KEY"} <= set(secrets)
    assert container["env"][-1]["name"] == "HTTPS_PROXY"
    assert kubelet_expand(container["env"][-1]["value"], secrets) == value


def test_a_bot_image_runs_only_where_the_chart_allows_it():
    bot = make_bot(podOverrides={"train": {"image": "registry.example/trainer:patched"}})
    with pytest.raises(InvalidSpec, match=r"spec.podOverrides.train.image: .*trainer.allowBotImages"):
        validate_spec(bot, SETTINGS)
    allowing = replace(SETTINGS, allow_bot_images=True)
    validate_spec(bot, allowing)
    run = run_id_for(bot)
    images = {stage: desired_job(bot, run, stage, allowing)["spec"]["template"]["spec"]["containers"][0]["image"]
              for stage in STAGES}
    assert images == {"scrape": "trainer:test", "train": "registry.example/trainer:patched", "publish": "trainer:test"}


def test_the_chart_setting_for_bot_images_is_read_as_a_boolean():
    assert Settings.from_env({}).allow_bot_images is False
    assert Settings.from_env({"TWEETBOT_ALLOW_BOT_IMAGES": "false"}).allow_bot_images is False
    assert Settings.from_env({"TWEETBOT_ALLOW_BOT_IMAGES": "true"}).allow_bot_images is True


NODE_CACHE = {"hostPath": {"path": "/var/cache/tweetbot/models", "type": "DirectoryOrCreate"}}
CACHING = replace(SETTINGS, model_cache_volume=NODE_CACHE)


def test_the_train_pod_alone_mounts_the_model_cache_the_chart_configures():
    bot = make_bot()
    run = run_id_for(bot)
    train = desired_job(bot, run, "train", CACHING)["spec"]["template"]["spec"]
    assert {"name": "model-cache", **NODE_CACHE} in train["volumes"]
    assert {"name": "model-cache", "mountPath": MODEL_CACHE_PATH} in train["containers"][0]["volumeMounts"]
    assert why_no_model_cache(with_defaults(bot), CACHING, Lineage()) == ""
    for stage in ("scrape", "publish"):
        assert "model-cache" not in json.dumps(desired_job(bot, run, stage, CACHING))
    assert "model-cache" not in json.dumps(desired_job(bot, run, "train", SETTINGS))  # not configured: none
    assert why_no_model_cache(with_defaults(bot), SETTINGS, Lineage()) == "the chart configures no trainer.modelCache"


@pytest.mark.parametrize("changes, lineage, reason", [
    # Read with the bot's token: other tenants' pods on the node would read it without one.
    ({"model": {"name": "meta-llama/Llama-3.2-1B", "tokenSecretRef": {"name": "hf-read", "key": "token"}}}, Lineage(),
     "spec.model.tokenSecretRef"),
    # Code the admin did not choose could write anything under a public model's name.
    ({"podOverrides": {"train": {"image": "registry.example/trainer:patched"}}}, Lineage(), "spec.podOverrides.train.image"),
    # Not from the Hub at all.
    ({"model": {"name": "s3://bots/base/llama/"}}, Lineage(), "s3:// prefix"),
    ({"model": {"name": "/models/llama"}}, Lineage(), "not a Hub model id"),
    ({"schedule": {"cron": "0 3 * * 1", "resumeFrom": "previous"}}, Lineage(starts_from_run="abc12"), "run abc12"),
], ids=["gated-model", "bot-image", "s3-model", "local-model", "earlier-runs-model"])
def test_the_model_cache_stays_out_of_pods_that_could_poison_it_or_leak_into_it(changes, lineage, reason):
    bot = make_bot(**changes)
    allowing = replace(CACHING, allow_bot_images=True)
    validate_spec(bot, allowing)
    pod = desired_job(bot, run_id_for(bot), "train", allowing, lineage=lineage)["spec"]["template"]["spec"]
    assert "model-cache" not in json.dumps(pod)
    assert reason in why_no_model_cache(with_defaults(bot), allowing, lineage)


def test_the_model_cache_is_mounted_whatever_env_the_train_pod_is_given():
    """podOverrides.env takes only names that cannot make the trainer run code of their choosing, so they leave the
    cache to the admin's code as the operator configured it."""
    env = [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "PYTORCH_CUDA_ALLOC_CONF", "value": "expandable_segments:True"},
           {"name": "HF_HUB_ENABLE_HF_TRANSFER", "value": "1"}, {"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]
    bot = make_bot(podOverrides={"train": {"env": env}})
    validate_spec(bot, CACHING)
    pod = desired_job(bot, run_id_for(bot), "train", CACHING)["spec"]["template"]["spec"]
    assert {"name": "model-cache", "mountPath": MODEL_CACHE_PATH} in pod["containers"][0]["volumeMounts"]
    assert why_no_model_cache(with_defaults(bot), CACHING, Lineage()) == ""


def test_the_model_cache_setting_is_one_volume_source_in_json():
    assert Settings.from_env({}).model_cache_volume is None
    assert Settings.from_env({"TWEETBOT_MODEL_CACHE_VOLUME": ""}).model_cache_volume is None
    nfs = {"nfs": {"server": "nfs.example", "path": "/models"}}
    assert Settings.from_env({"TWEETBOT_MODEL_CACHE_VOLUME": json.dumps(nfs)}).model_cache_volume == nfs
    for wrong, message in (("{", "not JSON"), ("[]", "one volume source"), ("{}", "one volume source"),
                           (json.dumps({**nfs, **NODE_CACHE}), "one volume source"), ('{"nfs": "x"}', "an object"),
                           ('{"name": {"x": 1}}', "not a volume source")):
        with pytest.raises(SettingsError, match=f"TWEETBOT_MODEL_CACHE_VOLUME.*{message}"):
            Settings.from_env({"TWEETBOT_MODEL_CACHE_VOLUME": wrong})


def test_the_operator_does_not_start_with_a_model_cache_it_cannot_mount():
    import subprocess
    import sys

    env = {**os.environ, "TWEETBOT_MODEL_CACHE_VOLUME": '{"hostPath": "/var/cache"}'}
    started = subprocess.run([sys.executable, "-m", "tweetbot_operator.cli", "operator"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert started.returncode == 2
    assert started.stderr.strip() == ('tweetbot operator: TWEETBOT_MODEL_CACHE_VOLUME: the hostPath source must be an '
                                      'object, not "/var/cache"')


def test_a_mig_slice_or_another_vendors_gpu_is_asked_for_by_its_resource_name():
    for name in ("nvidia.com/mig-1g.10gb", "amd.com/gpu"):
        bot = make_bot(podOverrides={"train": {"gpuResourceName": name}})
        validate_spec(bot, SETTINGS)
        pod = desired_job(bot, run_id_for(bot), "train", SETTINGS)["spec"]["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        assert resources["limits"][name] == "2" and resources["requests"][name] == "2"
        assert "nvidia.com/gpu" not in resources["limits"]
        # The taint the ExtendedResourceToleration admission plugin tolerates for the same request.
        assert pod["tolerations"] == [{"key": name, "operator": "Exists", "effect": "NoSchedule"}]


@pytest.mark.parametrize("name", ["TWEETBOT_REQUEST", "TWEETBOT_HUB_PUSH_TOKEN", "HF_TOKEN", "X_BEARER_TOKEN",
                                  "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "PET_NNODES", "WANDB_API_KEY",
                                  "OMP_NUM_THREADS", "WORLD_SIZE", "HF_ENDPOINT", "WANDB_BASE_URL",
                                  "MLFLOW_TRACKING_URI"])
def test_the_operator_refuses_env_it_sets_itself(name):
    bot = make_bot(podOverrides={"publish": {"env": [{"name": name, "value": "x"}]}})
    with pytest.raises(InvalidSpec, match=f"spec.podOverrides.publish.env {name!r} is set by the operator"):
        validate_spec(bot, SETTINGS)


# Each runs code the admin did not choose in the admin's image, with the bot's Secrets in its environment, or
# reaches past the pod: verified or read in the libraries' sources (see contract.ALLOWED_ENV_NAMES).
CODE_LOADING_ENV = [
    "PYTHONWARNINGS",  # imports the module a filter names (ignore::antigravity.x)
    "BROWSER",  # the command webbrowser runs
    "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "LD_PRELOAD", "LD_LIBRARY_PATH", "BASH_ENV", "NODE_OPTIONS",
    "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "GCONV_PATH",
    "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",  # torch.load unpickles whatever a checkpoint holds
    "TORCH_LOGS",  # imports the modules it names
    "TORCHINDUCTOR_CACHE_DIR", "TRITON_PTXAS_PATH", "TORCH_EXTENSIONS_DIR",
    "CUDA_INJECTION64_PATH",  # a library the CUDA driver loads
    "CUDA_CACHE_PATH",  # a directory of compiled kernels the driver loads
    "NVIDIA_VISIBLE_DEVICES",  # the container runtime may give the pod every GPU of the node
    "NCCL_NET_PLUGIN", "NCCL_TUNER_PLUGIN", "NCCL_IBVERBS_LIB", "NCCL_CONF_FILE", "NCCL_DEBUG_FILE",
    "TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
    "HF_HOME", "HF_HUB_CACHE", "HF_MODULES_CACHE", "HF_XET_DATA_DEFAULT_CAS_ENDPOINT",
    "WANDB_X_EXECUTABLE", "WANDB_DIR", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "MLFLOW_S3_ENDPOINT_URL",
    "HTTP_PROXY",  # sees and can answer plain-http traffic
    "OMP_TOOL_LIBRARIES", "UCX_MODULE_DIR", "DS_BUILD_OPS", "A",
]


@pytest.mark.parametrize("name", CODE_LOADING_ENV)
def test_the_operator_refuses_env_outside_the_allow_list(name):
    bot = make_bot(podOverrides={"train": {"env": [{"name": name, "value": "x"}]}})
    with pytest.raises(InvalidSpec, match=rf"spec.podOverrides.train.env {name!r} is not a variable a stage may be "
                                          r"given .*NCCL_\*.*docs/user-guide.md"):
        validate_spec(bot, SETTINGS)


@pytest.mark.parametrize("name", ["NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                                  "PYTORCH_CUDA_ALLOC_CONF", "TORCH_DISTRIBUTED_DEBUG", "CUDA_LAUNCH_BLOCKING",
                                  "OMP_PROC_BIND", "MKL_NUM_THREADS", "GLOO_SOCKET_IFNAME", "FI_EFA_USE_DEVICE_RDMA",
                                  "HF_HUB_ENABLE_HF_TRANSFER", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM",
                                  "WANDB_TAGS", "MLFLOW_HTTP_REQUEST_TIMEOUT", "HTTPS_PROXY", "NO_PROXY", "TZ", "LANG",
                                  "LC_ALL"])
def test_the_operator_takes_env_that_tunes_training(name):
    validate_spec(make_bot(podOverrides={"scrape": {"env": [{"name": name, "value": "x"}]}}), SETTINGS)


def test_every_name_the_contract_allows_is_taken_and_none_it_reserves():
    from tweetbot_trainer.contract import ALLOWED_ENV_NAMES, ALLOWED_ENV_PREFIXES, RESERVED_ENV_NAMES, env_allowed

    for name in ALLOWED_ENV_NAMES + tuple(prefix + "X" for prefix in ALLOWED_ENV_PREFIXES):
        assert env_allowed(name), name
        validate_spec(make_bot(podOverrides={"publish": {"env": [{"name": name, "value": "x"}]}}), SETTINGS)
    assert not set(ALLOWED_ENV_NAMES) & set(RESERVED_ENV_NAMES)


@pytest.mark.parametrize("env, message", [
    ([{"name": "1X", "value": "x"}], "is not an environment variable name"),
    ([{"name": "NCCL_DEBUG", "value": "x"}, {"name": "NCCL_DEBUG", "value": "y"}], "names NCCL_DEBUG more than once"),
    ([{"name": "NCCL_DEBUG", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}], "only name and value"),
])
def test_override_env_is_plain_values_with_variable_names(env, message):
    with pytest.raises(InvalidSpec, match=message):
        validate_spec(make_bot(podOverrides={"train": {"env": env}}), SETTINGS)


@pytest.mark.parametrize("field, key", [
    ("labels", "app.kubernetes.io/component"), ("labels", "huggingtweets.dev/run"), ("labels", KUEUE_QUEUE_LABEL),
    ("labels", "batch.kubernetes.io/job-name"), ("annotations", "huggingtweets.dev/rerun"),
])
def test_the_operators_own_labels_cannot_be_overridden(field, key):
    bot = make_bot(podOverrides={"scrape": {field: {key: "x"}}})
    with pytest.raises(InvalidSpec, match=f"spec.podOverrides.scrape.{field} {key!r} is the operator's"):
        validate_spec(bot, SETTINGS)


@pytest.mark.parametrize("overrides, message", [
    ({"train": {"labels": {"bad key!": "x"}}}, "spec.podOverrides.train.labels 'bad key!' is not a label key"),
    ({"train": {"labels": {"team": "a b"}}}, "spec.podOverrides.train.labels.team 'a b' is not a label value"),
    ({"train": {"annotations": {"a/b/c": "x"}}}, "spec.podOverrides.train.annotations 'a/b/c' is not an annotation key"),
    ({"train": {"gpuResourceName": "gpu"}}, "spec.podOverrides.train.gpuResourceName 'gpu' is not an extended resource"),
    ({"train": {"gpuResourceName": "kubernetes.io/gpu"}}, "is not an extended resource"),
    ({"scrape": {"gpuResourceName": "amd.com/gpu"}}, "spec.podOverrides.scrape.gpuResourceName: only train"),
    ({"train": {"runtimeClassName": "Kata_QEMU"}}, "spec.podOverrides.train.runtimeClassName 'Kata_QEMU'"),
    ({"publish": {"imagePullSecrets": [{"name": "../x"}]}}, "spec.podOverrides.publish.imagePullSecrets"),
], ids=["label-key", "label-value", "annotation-key", "resource-without-domain", "kubernetes-resource",
        "gpu-of-scrape", "runtime-class", "pull-secret"])
def test_the_operator_refuses_overrides_the_crd_refuses(overrides, message):
    with pytest.raises(InvalidSpec, match=message.replace(".", r"\.")):
        validate_spec(make_bot(podOverrides=overrides), SETTINGS)


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_job_fails_at_once_on_errors_no_retry_can_mend_and_ignores_disruptions(stage):
    from tweetbot_trainer import errors

    bot = make_bot()
    rules = desired_job(bot, run_id_for(bot), stage, SETTINGS)["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    fail = rules[1]["onExitCodes"]
    assert rules[1]["action"] == "FailJob" and fail["containerName"] == stage and fail["operator"] == "In"
    for permanent in (errors.UnknownHandle, errors.AuthenticationFailed, errors.DatasetTooSmall, errors.OutOfMemory):
        assert permanent.exit_code in fail["values"]
    # Worth another pod: a rate limit or network error may pass, another node may have a working GPU.
    for transient in (errors.StageError, errors.RateLimited, errors.NetworkFailure, errors.CheckpointUploadFailed,
                      errors.NoUsableGPU):
        assert transient.exit_code not in fail["values"]


def test_the_train_pod_runs_one_process_per_gpu_and_mounts_a_deepspeed_config():
    bot = make_bot(resources={"gpus": 4, "cpu": "16", "memory": "64Gi"},
                   training={"deepspeed": {"configMapRef": {"name": "ds", "key": "zero3.json"}}})
    pod = desired_job(bot, run_id_for(bot), "train", SETTINGS)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["tweetbot-trainer", "train", "--nproc-per-node=4"]
    assert {"name": "OMP_NUM_THREADS", "value": "4"} in container["env"]
    assert {"name": "deepspeed-config", "mountPath": "/etc/tweetbot/deepspeed", "readOnly": True} in container["volumeMounts"]
    assert {"name": "deepspeed-config", "configMap": {"name": "ds", "items": [{"key": "zero3.json", "path": "ds_config.json"}]}} in pod["volumes"]
    cpu_bot = make_bot(resources={"gpus": 0, "cpu": "2500m"})
    container = desired_job(cpu_bot, run_id_for(cpu_bot), "train", SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["tweetbot-trainer", "train"]
    assert {"name": "DS_ACCELERATOR", "value": "cpu"} in container["env"]
    assert {"name": "OMP_NUM_THREADS", "value": "2"} in container["env"]


def test_each_stage_gets_only_its_secrets_and_the_request_holds_none():
    bot = make_bot()
    run = run_id_for(bot)
    env_of = {}
    for stage in ("scrape", "train", "publish"):
        container = desired_job(bot, run, stage, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
        env_of[stage] = {item["name"]: item for item in container["env"]}
        request = StageRequest.from_json(env_of[stage]["TWEETBOT_REQUEST"]["value"])
        assert request.stage == stage and request.handles == ["purefulsoul", "turtlebreezee"]
        assert "SecretRef" not in env_of[stage]["TWEETBOT_REQUEST"]["value"]
    assert env_of["scrape"]["X_BEARER_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "x-api", "key": "token"}}
    assert "HF_TOKEN" not in env_of["scrape"] and "X_BEARER_TOKEN" not in env_of["train"]
    assert env_of["publish"]["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf"
    assert "HF_TOKEN" not in env_of["train"]  # no gated base model named


def test_a_gated_base_models_token_reaches_the_train_stage_only():
    bot = make_bot(model={"name": "meta-llama/Llama-3.2-1B", "tokenSecretRef": {"name": "hf-read"}})
    env_of = {stage: {item["name"]: item for item in desired_job(bot, run_id_for(bot), stage, SETTINGS)
                      ["spec"]["template"]["spec"]["containers"][0]["env"]} for stage in ("scrape", "train", "publish")}
    assert env_of["train"]["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-read", "key": "token"}}
    assert env_of["publish"]["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf"
    assert "HF_TOKEN" not in env_of["scrape"]
    assert "tokenSecretRef" not in env_of["train"]["TWEETBOT_REQUEST"]["value"]
    decided, _ = step(bot, Observed(secrets=ALL_SECRETS, jobs=[job(bot, "scrape", "Succeeded")],
                                    results={job_name(bot, run_id_for(bot), "scrape"): result(bot, "scrape")}))
    assert "Secret 'hf-read' (named by spec.model.tokenSecretRef) does not exist" in decided.status["lastError"]
    assert all("AWS_SECRET_ACCESS_KEY" in env for env in env_of.values())


def test_checkpoints_on_the_hub_give_the_train_stage_the_push_token_under_its_own_name():
    """The base model's read token stays HF_TOKEN, which huggingface_hub sends on downloads; the output repo's
    token reaches the train stage only when it pushes checkpoints, under a name no library reads."""
    gated = {"name": "meta-llama/Llama-3.2-1B", "tokenSecretRef": {"name": "hf-read"}}
    hub = {"tokenSecretRef": {"name": "hf", "key": "write"}, "checkpoints": True}
    for model, checkpoints in ((gated, True), (gated, False), ({"name": "gpt2"}, True)):
        bot = make_bot(model=model, output={"s3": {"bucket": "bots"}, "hub": {**hub, "checkpoints": checkpoints}})
        env = {item["name"]: item for item in desired_job(bot, run_id_for(bot), "train", SETTINGS)
               ["spec"]["template"]["spec"]["containers"][0]["env"]}
        if checkpoints:
            assert env[HUB_PUSH_TOKEN_ENV]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "write"}}
            request = StageRequest.from_json(env["TWEETBOT_REQUEST"]["value"])
            assert request.hub["checkpoints"] is True and request.hub["checkpointBranch"] == "checkpoints"
        else:
            assert HUB_PUSH_TOKEN_ENV not in env
        if "tokenSecretRef" in model:
            assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-read", "key": "token"}}
        else:
            assert "HF_TOKEN" not in env
        publish = desired_job(bot, run_id_for(bot), "publish", SETTINGS)["spec"]["template"]["spec"]["containers"][0]["env"]
        assert HUB_PUSH_TOKEN_ENV not in {item["name"] for item in publish}


@pytest.mark.parametrize("branch", ["main", "-x", "a..b", "a/b", "refs/heads/x", "x" * 101, "a b", "", "x.lock", "x."])
def test_a_checkpoint_branch_must_be_one_safe_name_and_not_main(branch):
    bot = make_bot(output={"s3": {"bucket": "bots"}, "hub": {"tokenSecretRef": {"name": "hf"}, "checkpoints": True,
                                                             "checkpointBranch": branch}})
    with pytest.raises(InvalidSpec, match="spec.output.hub.checkpointBranch"):
        validate_spec(bot, SETTINGS)
    bot["spec"]["output"]["hub"]["checkpointBranch"] = "checkpoints-v2.1_a"
    validate_spec(bot, SETTINGS)


def env_by_stage(bot) -> dict[str, dict[str, dict]]:
    return {stage: {item["name"]: item for item in desired_job(bot, run_id_for(bot), stage, SETTINGS)
                    ["spec"]["template"]["spec"]["containers"][0]["env"]} for stage in ("scrape", "train", "publish")}


TRACKED = {"wandb": {"project": "bots", "apiKeySecretRef": {"name": "wandb"}},
           "mlflow": {"trackingUri": "https://mlflow.example/", "tokenSecretRef": {"name": "mlflow", "key": "bearer"}}}


def test_a_trackers_key_reaches_the_train_stage_only_when_report_to_names_it():
    asked = make_bot(training={"reportTo": ["tensorboard", "wandb", "mlflow"], **TRACKED})
    env_of = env_by_stage(asked)
    assert env_of["train"]["WANDB_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "wandb", "key": "apiKey"}}
    assert env_of["train"]["MLFLOW_TRACKING_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "mlflow", "key": "bearer"}}
    assert not {"WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN"} & (set(env_of["scrape"]) | set(env_of["publish"]))
    request = StageRequest.from_json(env_of["train"]["TWEETBOT_REQUEST"]["value"])
    assert "SecretRef" not in env_of["train"]["TWEETBOT_REQUEST"]["value"]
    assert request.training["reportTo"] == ["tensorboard", "wandb", "mlflow"]
    assert request.training["wandb"] == {"project": "bots"} and request.training["mlflow"]["experiment"] == "tweetbot"

    # Settings kept for later but not reported to: no key is read.
    idle = env_by_stage(make_bot(training={"reportTo": ["tensorboard"], **TRACKED}))["train"]
    assert "WANDB_API_KEY" not in idle and "MLFLOW_TRACKING_TOKEN" not in idle
    secrets = {**ALL_SECRETS, "wandb": secret("apiKey"), "mlflow": None}
    decided, _ = step(asked, Observed(secrets=secrets, jobs=[job(asked, "scrape", "Succeeded")],
                                      results={job_name(asked, run_id_for(asked), "scrape"): result(asked, "scrape")}))
    assert decided.create == []
    assert "Secret 'mlflow' (named by spec.training.mlflow.tokenSecretRef) does not exist" in decided.status["lastError"]


@pytest.mark.parametrize("training, message", [
    ({"reportTo": ["wandb"]}, "reportTo lists wandb: set spec.training.wandb"),
    ({"reportTo": ["mlflow"]}, "reportTo lists mlflow: set spec.training.mlflow"),
    ({"reportTo": ["tensorboard", "tensorboard"]}, "at most once"),
    ({"reportTo": ["comet"]}, "at most once"),
    ({"reportTo": ["mlflow"], "mlflow": {"trackingUri": "javascript:alert(1)"}}, "spec.training.mlflow.trackingUri"),
    ({"reportTo": ["mlflow"], "mlflow": {"trackingUri": "https://user@evil.example"}}, "spec.training.mlflow.trackingUri"),
    ({"reportTo": ["wandb"], "wandb": {"host": "https://wandb.example/?x=1", "apiKeySecretRef": {"name": "w"}}},
     "spec.training.wandb.host"),
    ({"reportTo": ["wandb"], "wandb": {"project": "a/b", "apiKeySecretRef": {"name": "w"}}}, "spec.training.wandb.project"),
    ({"reportTo": ["wandb"], "wandb": {"apiKeySecretRef": {"name": "../w"}}}, "apiKeySecretRef.name"),
], ids=["wandb-without-settings", "mlflow-without-settings", "twice", "unknown", "script-uri", "userinfo", "query",
        "project-with-slash", "secret-name"])
def test_the_operator_refuses_tracker_settings_the_crd_refuses(training, message):
    with pytest.raises(InvalidSpec, match=message.replace("?", r"\?")):
        validate_spec(make_bot(training=training), SETTINGS)
    validate_spec(make_bot(training={"reportTo": ["wandb", "mlflow"], **TRACKED}), SETTINGS)


def test_job_names_fit_kubernetes_limits_and_pods_cannot_call_the_api():
    bot = make_bot()
    bot["metadata"]["name"] = "a" * 40  # the CRD's maximum
    for stage in STAGES:
        # The pods' job-name label holds it (63 at most); the API server cuts a generated pod name's base to 58.
        assert len(job_name(bot, run_id_for(bot), stage)) <= 63
    manifest = desired_job(bot, run_id_for(bot), "publish", SETTINGS)
    pod = manifest["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


# --- Jobs -> status -------------------------------------------------------------------------------

def test_a_new_bot_starts_scraping():
    bot = make_bot()
    decided, bot = step(bot, Observed(secrets=ALL_SECRETS))
    assert [m["metadata"]["name"] for m in decided.create] == [job_name(bot, run_id_for(bot), "scrape")]
    assert bot["status"]["phase"] == "Scraping"
    assert condition(bot["status"], "Reconciling")["status"] == "True"
    assert condition(bot["status"], "Ready")["status"] == "False"
    assert decided.events[0][:2] == ("Normal", "JobCreated")


def test_stages_run_in_order_and_results_reach_the_status():
    bot = make_bot()
    stats = [HandleStats("purefulsoul", 3200, 100, 50, 3050, "Pureful Soul"), HandleStats("turtlebreezee", 10, 0, 1, 9)]
    scrape_done = [job(bot, "scrape", "Succeeded")]
    results = {scrape_done[0]["metadata"]["name"]: result(bot, "scrape", data=stats,
                                                          artifacts={"datasetUri": "s3://bots/d.jsonl"})}
    decided, bot = step(bot, Observed(jobs=scrape_done, results=results, secrets=ALL_SECRETS))
    assert [m["metadata"]["labels"]["huggingtweets.dev/stage"] for m in decided.create] == ["train"]
    assert bot["status"]["phase"] == "Training"
    assert bot["status"]["data"][0] == {"handle": "purefulsoul", "downloaded": 3200, "retweets": 100, "short": 50,
                                        "kept": 3050, "displayName": "Pureful Soul"}
    assert condition(bot["status"], "DataReady")["status"] == "True"

    # The scrape Job is gone (ttlSecondsAfterFinished): the status remembers it, nothing is re-run.
    jobs = [job(bot, "train", "Succeeded"), job(bot, "publish", "Succeeded")]
    results = {jobs[0]["metadata"]["name"]: result(bot, "train", metrics={"evalLoss": 2.5, "perplexity": 12.18}),
               jobs[1]["metadata"]["name"]: result(bot, "publish", artifacts={"hubUrl": "https://hf.co/o/b",
                                                                               "hubCommit": "c0ffee"})}
    decided, bot = step(bot, Observed(jobs=jobs, results=results, secrets=ALL_SECRETS))
    assert decided.create == [] and decided.delete == []
    status = bot["status"]
    assert status["phase"] == "Succeeded" and status["progress"]["summary"] == "3/3"
    assert status["metrics"]["perplexity"] == 12.18
    assert status["artifacts"] == {"datasetUri": "s3://bots/d.jsonl", "hubUrl": "https://hf.co/o/b", "hubCommit": "c0ffee"}
    assert status["data"][1]["handle"] == "turtlebreezee"
    for type_, value in (("Ready", "True"), ("Reconciling", "False"), ("Stalled", "False"), ("Trained", "True"),
                         ("Published", "True")):
        assert condition(status, type_)["status"] == value
    assert status["completionTime"] == "2026-11-22T12:00:00Z"


def test_a_failed_stage_fails_the_bot_with_its_reason():
    bot = make_bot()
    failed = job(bot, "scrape", "Failed", failed=3)
    results = {failed["metadata"]["name"]: result(bot, "scrape", ok=False, error="X API answered 401: check x-api")}
    decided, bot = step(bot, Observed(jobs=[failed], results=results, secrets=ALL_SECRETS))
    status = bot["status"]
    assert status["phase"] == "Failed" and status["attempts"] == 3
    assert "failed after 3 attempt(s): X API answered 401" in status["lastError"]
    assert condition(status, "Stalled")["status"] == "True" and condition(status, "Ready")["reason"] == "StageFailed"
    assert decided.create == [] and decided.events[0][0] == "Warning"


def test_success_without_a_result_is_a_failure():
    bot = make_bot()
    decided, bot = step(bot, Observed(jobs=[job(bot, "scrape", "Succeeded")], secrets=ALL_SECRETS))
    assert bot["status"]["phase"] == "Failed" and "reported no result" in bot["status"]["lastError"]


def test_a_spec_edit_removes_the_old_run():
    bot = make_bot()
    old_run = run_id_for(bot)
    _, bot = step(bot, Observed(jobs=[job(bot, "scrape", "Running")], secrets=ALL_SECRETS))
    bot["spec"]["training"] = {"epochs": 8}
    bot["metadata"]["generation"] = 2
    new_run = run_id_for(bot)
    assert new_run != old_run
    decided, bot = step(bot, Observed(jobs=[job(bot, "scrape", "Running", run_id=old_run)], secrets=ALL_SECRETS))
    assert decided.delete == [job_name(bot, old_run, "scrape")]
    assert [m["metadata"]["labels"][RUN_LABEL] for m in decided.create] == [new_run]
    assert bot["status"]["runId"] == new_run and bot["status"]["observedGeneration"] == 2


def test_suspend_stops_the_running_stage_and_resume_recreates_it():
    bot = make_bot()
    train = [job(bot, "scrape", "Succeeded"), job(bot, "train", "Running")]
    results = {train[0]["metadata"]["name"]: result(bot, "scrape")}
    _, bot = step(bot, Observed(jobs=train, results=results, secrets=ALL_SECRETS))
    bot["spec"]["suspend"], bot["metadata"]["generation"] = True, 2
    decided, bot = step(bot, Observed(jobs=train, secrets=ALL_SECRETS))
    assert decided.delete == [job_name(bot, run_id_for(bot), "train")] and decided.create == []
    assert bot["status"]["phase"] == "Suspended"
    assert condition(bot["status"], "Reconciling")["status"] == "False"

    bot["spec"]["suspend"], bot["metadata"]["generation"] = False, 3
    decided, bot = step(bot, Observed(jobs=train[:1], secrets=ALL_SECRETS))
    assert [m["metadata"]["name"] for m in decided.create] == [job_name(bot, run_id_for(bot), "train")]
    assert bot["status"]["phase"] == "Training"


def test_a_missing_secret_stalls_with_what_to_fix_and_creates_nothing():
    bot = make_bot()
    decided, bot = step(bot, Observed(secrets={**ALL_SECRETS, "x-api": None}))
    assert decided.create == []
    assert bot["status"]["phase"] == "Pending"
    assert condition(bot["status"], "Stalled")["status"] == "True"
    assert bot["status"]["lastError"] == "Secret 'x-api' (named by spec.source.x.bearerTokenSecretRef) does not exist"

    decided, _ = step(bot, Observed(secrets={**ALL_SECRETS, "x-api": secret("other")}))
    assert "has no key 'token'" in decided.status["lastError"]


def test_the_operator_limits_concurrent_trainings():
    bot = make_bot()
    jobs = [job(bot, "scrape", "Succeeded")]
    results = {jobs[0]["metadata"]["name"]: result(bot, "scrape")}
    limited = Settings(max_concurrent_trainings=2)
    decided = plan(bot, Observed(jobs=jobs, results=results, secrets=ALL_SECRETS, other_active_trainings=2), limited, NOW)
    assert decided.create == [] and decided.status["phase"] == "Queued"
    decided = plan(bot, Observed(jobs=jobs, results=results, secrets=ALL_SECRETS, other_active_trainings=1), limited, NOW)
    assert decided.status["phase"] == "Training"


def test_condition_times_change_only_on_transitions():
    bot = make_bot()
    _, bot = step(bot, Observed(secrets=ALL_SECRETS))
    ready_since = condition(bot["status"], "Ready")["lastTransitionTime"]
    later = plan(bot, Observed(jobs=[job(bot, "scrape", "Running")], secrets=ALL_SECRETS), SETTINGS, NOW + timedelta(hours=1))
    assert condition(later.status, "Ready")["lastTransitionTime"] == ready_since
    assert condition(later.status, "Ready")["reason"] == "ScrapeRunning"


def test_status_patch_removes_dropped_fields_at_every_depth():
    old = {"phase": "Failed", "lastError": "x", "runId": "r", "progress": {"step": 3, "summary": "train 1%"}}
    new = {"phase": "Scraping", "runId": "r", "progress": {"summary": "2/3"}}
    assert status_patch(old, new) == {"phase": "Scraping", "lastError": None, "progress": {"step": None, "summary": "2/3"}}
    assert status_patch(new, new) == {}


# --- the contract ---------------------------------------------------------------------------------

def test_a_stage_refuses_a_contract_it_does_not_know():
    request = json.loads(StageRequest.from_json(
        desired_job(make_bot(), "abc123", "scrape", SETTINGS)["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"]
    ).to_json())
    request["version"] = 2
    with pytest.raises(ContractError, match="contract version 2, this side speaks version 1"):
        StageRequest.from_json(json.dumps(request))


def test_results_round_trip_and_stay_within_the_termination_message_limit():
    stats = [HandleStats("a", 10, 1, 2, 7)]
    sent = StageResult("scrape", "abc123", data=stats, artifacts={"datasetUri": "s3://b/k"})
    assert StageResult.from_termination_message(sent.to_termination_message()) == sent
    with pytest.raises(ContractError, match="limit is 4096"):
        StageResult("scrape", "abc123", error="x" * 5000).to_termination_message()
    with pytest.raises(ContractError, match="do not add up"):
        HandleStats("a", 10, 1, 2, 3)


def test_live_progress_shows_while_training_only():
    bot = make_bot()
    jobs = [job(bot, "scrape", "Succeeded"), job(bot, "train", "Running")]
    results = {jobs[0]["metadata"]["name"]: result(bot, "scrape")}
    report = Progress(step=30, total_steps=40, loss=2.0, updated_at="2026-11-22T11:59:30Z")
    decided, _ = step(bot, Observed(jobs=jobs, results=results, secrets=ALL_SECRETS, progress=report))
    assert decided.status["progress"] == {"step": 30, "totalSteps": 40, "loss": 2.0, "updatedAt": "2026-11-22T11:59:30Z",
                                          "summary": "train 75% (30/40 steps)"}
    assert Progress.from_json(report.to_json()) == report
    decided, _ = step(bot, Observed(jobs=jobs, results=results, secrets=ALL_SECRETS))
    assert decided.status["progress"] == {"summary": "1/3"}


def test_a_started_job_is_running_until_it_ends_even_between_pods():
    bot = make_bot()
    between_pods = job(bot, "scrape", "Running")
    between_pods["status"]["active"] = 0  # a pod done, the Job's condition not yet set (or a retry's back-off)
    assert job_state(between_pods) == "Running"
    assert job_state({"metadata": {}, "spec": {}, "status": {}}) == "Pending"
    assert job_state({"metadata": {}, "spec": {"suspend": True}, "status": {}}) == "Queued"


def test_a_queued_stage_says_why_kueue_has_not_admitted_it():
    bot = make_bot(resources={"gpus": 8, "nodes": 4, "queueName": "team-a"})
    queued = job(bot, "scrape", "Pending")
    queued["spec"]["suspend"] = True
    name = queued["metadata"]["name"]
    waiting = "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in flavor a100, request > maximum capacity (64 > 32)"
    decided = settle(bot, Observed(jobs=[queued], secrets=ALL_SECRETS, admission={name: waiting}))
    assert decided.status["phase"] == "Queued" and decided.status["stages"]["scrape"]["state"] == "Pending"
    assert condition(decided.status, "Reconciling")["message"] == f"Job {name} is queued: {waiting}"
    # What the plan asks for, the controller reads: nothing there (no Kueue) keeps the plain message.
    assert plan(bot, Observed(jobs=[queued], secrets=ALL_SECRETS), SETTINGS, NOW).needs.admission == (name,)
    assert condition(settle(bot, Observed(jobs=[queued], secrets=ALL_SECRETS)).status, "Reconciling")["message"] == f"Job {name} is queued"


def test_the_admission_message_is_the_newest_workloads_unmet_condition():
    def workload(created, *conditions):
        return {"metadata": {"creationTimestamp": created},
                "status": {"conditions": [{"type": t, "status": s, "message": m} for t, s, m in conditions]}}

    assert admission_message([]) is None
    assert admission_message([workload("2026-12-03T10:00:00Z", ("QuotaReserved", "True", "Quota reserved"),
                                       ("Admitted", "True", "The workload is admitted"))]) is None
    old = workload("2026-12-03T09:00:00Z", ("QuotaReserved", "False", "LocalQueue team-a doesn't exist"))
    new = workload("2026-12-03T10:00:00Z", ("QuotaReserved", "False", "insufficient quota for nvidia.com/gpu"))
    assert admission_message([new, old]) == admission_message([old, new]) == "insufficient quota for nvidia.com/gpu"
    checks = workload("2026-12-03T10:00:00Z", ("QuotaReserved", "True", "Quota reserved"),
                      ("Admitted", "False", "The workload has not all checks ready"))
    assert admission_message([checks]) == "The workload has not all checks ready"
    assert len(admission_message([workload("2026-12-03T10:00:00Z", ("QuotaReserved", "False", "x" * 5000))])) <= 512


def test_job_fingerprint_ignores_pod_bookkeeping_but_not_outcomes():
    bot = make_bot()
    running = job(bot, "scrape", "Running")
    bookkeeping = copy.deepcopy(running)
    bookkeeping["status"].update(ready=1, uncountedTerminatedPods={"succeeded": ["uid"]}, active=0)
    assert job_fingerprint(bookkeeping) == job_fingerprint(running)
    retried = copy.deepcopy(running)
    retried["status"]["failed"] = 1
    assert job_fingerprint(retried) != job_fingerprint(running)
    assert job_fingerprint(job(bot, "scrape", "Succeeded")) != job_fingerprint(running)


def test_finished_jobs_are_deleted_after_their_ttl_only_once_their_result_is_in_the_status():
    bot = make_bot(ttlSecondsAfterFinished=30)
    assert "ttlSecondsAfterFinished" not in desired_job(bot, run_id_for(bot), "scrape", SETTINGS)["spec"]
    scrape = job(bot, "scrape", "Succeeded")
    scrape["status"]["completionTime"] = "2026-11-22T11:59:50Z"  # 10 s before NOW
    results = {scrape["metadata"]["name"]: result(bot, "scrape")}
    decided, bot = step(bot, Observed(jobs=[scrape], results=results, secrets=ALL_SECRETS))
    assert decided.delete == [] and decided.requeue_after == 20  # recorded by this pass, due in 20 s
    train = job(bot, "train", "Running")
    decided = settle(bot, Observed(jobs=[scrape, train], secrets=ALL_SECRETS), now=NOW + timedelta(seconds=20))
    assert decided.delete == [scrape["metadata"]["name"]] and decided.requeue_after is None
    decided = settle(bot, Observed(jobs=[train], secrets=ALL_SECRETS), now=NOW + timedelta(seconds=21))
    assert decided.create == [] and decided.status["stages"]["scrape"]["state"] == "Succeeded"


def test_a_failed_stage_stays_failed_after_its_job_is_removed():
    bot = make_bot(ttlSecondsAfterFinished=0)
    failed = job(bot, "scrape", "Failed", failed=3)
    failed["status"]["conditions"][0]["lastTransitionTime"] = "2026-11-22T11:00:00Z"
    results = {failed["metadata"]["name"]: result(bot, "scrape", ok=False, error="unknown handle purefulsoul")}
    decided, bot = step(bot, Observed(jobs=[failed], results=results, secrets=ALL_SECRETS))
    assert decided.delete == [] and bot["status"]["phase"] == "Failed"
    decided, bot = step(bot, Observed(jobs=[failed], secrets=ALL_SECRETS))
    assert decided.delete == [failed["metadata"]["name"]]
    decided, bot = step(bot, Observed(secrets=ALL_SECRETS))
    assert decided.create == [] and bot["status"]["phase"] == "Failed"
    assert bot["status"]["lastError"] == "stage scrape failed: unknown handle purefulsoul"


def test_an_oom_killed_stage_says_so_instead_of_showing_its_log_as_a_result():
    from tweetbot_operator.jobs import stage_result_from_pod

    def pod(**terminated):
        return {"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 137, **terminated}}}]}}

    killed = stage_result_from_pod(pod(reason="OOMKilled", message="loading tweets.js\n"), "scrape")
    assert not killed.ok and killed.error == ("the scrape container ran out of memory (OOMKilled); "
                                              "raise the chart's trainer.scrape.memory")
    assert "spec.resources.memory" in stage_result_from_pod(pod(reason="OOMKilled"), "train").error
    garbled = stage_result_from_pod(pod(reason="Error", message="Traceback (most recent call last):"), "scrape")
    assert not garbled.ok and "is not a JSON object" in garbled.error
    assert stage_result_from_pod(pod(reason="Error"), "scrape") is None


# --- several nodes ---------------------------------------------------------------------------------

def test_a_multi_node_training_is_one_indexed_job_of_pods_that_find_each_other():
    from tweetbot_operator.stages import headless_service

    bot = make_bot(resources={"gpus": 8, "nodes": 4, "cpu": "32", "memory": "256Gi"})
    run = run_id_for(bot)
    train = desired_job(bot, run, "train", SETTINGS)
    name = train["metadata"]["name"]
    assert (train["spec"]["completionMode"], train["spec"]["completions"], train["spec"]["parallelism"]) == ("Indexed", 4, 4)
    pod = train["spec"]["template"]["spec"]
    assert pod["subdomain"] == name
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8" and container["command"][-1] == "--nproc-per-node=8"
    env = {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}
    assert env["PET_NNODES"] == "4" and env["PET_RDZV_BACKEND"] == "c10d" and env["PET_RDZV_ID"] == run
    assert env["PET_RDZV_ENDPOINT"] == f"{name}-0.{name}:29400"
    assert env["PET_NODE_RANK"] == {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    service = headless_service(train)
    assert service["metadata"]["name"] == name and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    for stage in ("scrape", "publish"):  # one CPU pod each, whatever the training's size
        single = desired_job(bot, run, stage, SETTINGS)
        assert "completionMode" not in single["spec"] and headless_service(single) is None
    assert headless_service(desired_job(make_bot(), run, "train", SETTINGS)) is None
    # Queued: created suspended with its queue's label, for Kueue to admit the whole Indexed Job as one workload.
    queued = desired_job(make_bot(resources={"gpus": 8, "nodes": 4, "queueName": "team-a"}), run, "train", SETTINGS)
    assert queued["spec"]["suspend"] is True and queued["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
    assert queued["spec"]["parallelism"] == 4


def test_gpus_beyond_what_a_node_holds_are_refused():
    bot = make_bot(resources={"gpus": 16, "nodes": 2})
    with pytest.raises(InvalidSpec, match=r"spec.resources.gpus 16 is more than a node of this cluster holds \(8"):
        validate_spec(bot, SETTINGS)
    validate_spec(bot, replace(SETTINGS, max_gpus_per_node=16))


def test_a_gangs_status_counts_its_ready_pods():
    bot = make_bot(resources={"gpus": 8, "nodes": 4})
    scrape, train = job(bot, "scrape", "Succeeded"), job(bot, "train", "Running")
    train["status"]["ready"] = 3
    decided, _ = step(bot, Observed(jobs=[scrape, train], results={scrape["metadata"]["name"]: result(bot, "scrape")},
                                    secrets=ALL_SECRETS))
    assert decided.status["stages"]["train"]["pods"] == 4 and decided.status["stages"]["train"]["readyPods"] == 3


def test_a_gang_whose_pod_failed_starts_again_as_a_whole_backoff_limit_times():
    bot = make_bot(resources={"gpus": 8, "nodes": 2}, backoffLimit=2)
    scrape = job(bot, "scrape", "Succeeded")
    results = {scrape["metadata"]["name"]: result(bot, "scrape")}
    train_name = job_name(bot, run_id_for(bot), "train")
    rules = desired_job(bot, run_id_for(bot), "train", SETTINGS)["spec"]["podFailurePolicy"]["rules"]
    assert rules[-1] == {"action": "FailJob", "onExitCodes": {"containerName": "train", "operator": "NotIn", "values": [0]}}
    _, bot = step(bot, Observed(jobs=[scrape], results=results, secrets=ALL_SECRETS))
    for attempt in (1, 2, 3):
        failed = job(bot, "train", "Failed", failed=1)
        failed["metadata"]["uid"] = f"uid-{attempt}"
        failed["status"]["conditions"][0].update(reason="PodFailurePolicy", message=(
            f"Container train for pod bots/{train_name}-1-k5vdx failed with exit code 1 matching FailJob rule at index 2"))
        gone = {**results, train_name: result(bot, "train", ok=False, error="StageFailed: gloo: Connection reset by peer")}
        decided, bot = step(bot, Observed(jobs=[scrape, failed], results=gone, secrets=ALL_SECRETS))
        if attempt == 3:
            break
        assert decided.delete == [train_name] and bot["status"]["phase"] == "Training"
        assert condition(bot["status"], "Ready")["reason"] == "GangRestarting"
        assert bot["status"]["stages"]["train"]["restarts"] == attempt and bot["status"]["stages"]["train"]["failedPod"] == 1
        assert "pod 1 of Job" in condition(bot["status"], "Ready")["message"]
        assert [(kind, reason) for kind, reason, _ in decided.events if reason == "GangRestarting"] == [("Warning", "GangRestarting")]
        decided, bot = step(bot, Observed(jobs=[scrape, failed], results=gone, secrets=ALL_SECRETS))  # still going
        assert bot["status"]["stages"]["train"]["restarts"] == attempt and not decided.events
        decided, bot = step(bot, Observed(jobs=[scrape], results=results, secrets=ALL_SECRETS))  # gone: again
        assert [m["metadata"]["name"] for m in decided.create] == [train_name]
        assert bot["status"]["stages"]["train"]["restarts"] == attempt
    assert bot["status"]["phase"] == "Failed" and "Connection reset by peer" in bot["status"]["lastError"]


def test_a_gang_failing_with_an_error_no_retry_mends_is_not_restarted():
    bot = make_bot(resources={"gpus": 8, "nodes": 2})
    scrape, failed = job(bot, "scrape", "Succeeded"), job(bot, "train", "Failed", failed=1)
    decided, bot = step(bot, Observed(jobs=[scrape, failed], secrets=ALL_SECRETS, results={
        scrape["metadata"]["name"]: result(bot, "scrape"),
        failed["metadata"]["name"]: result(bot, "train", ok=False, error="DatasetTooSmall: 3 posts")}))
    assert decided.delete == [] and bot["status"]["phase"] == "Failed"
