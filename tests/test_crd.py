"""The TweetBot CRD on the real API server: defaults, printer columns, and bad input refused at `kubectl apply`."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tweetbot_trainer.contract import SPEC_DEFAULTS

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "crds" / "huggingtweets.dev_tweetbots.yaml"


@pytest.fixture(scope="module")
def kubectl(dev_env):
    def run(*args: str, manifest: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(dev_env.cluster.kubectl), "--kubeconfig", str(dev_env.kubeconfig), *args],
            input=None if manifest is None else json.dumps(manifest),
            capture_output=True,
            text=True,
        )

    applied = run("apply", "-f", str(CRD))
    assert applied.returncode == 0, applied.stderr
    established = run("wait", "--for=condition=Established", "crd/tweetbots.huggingtweets.dev", "--timeout=60s")
    assert established.returncode == 0, established.stderr
    return run


def bot(**spec_changes) -> dict:
    manifest = {
        "apiVersion": "huggingtweets.dev/v1alpha1",
        "kind": "TweetBot",
        "metadata": {"name": "valid-bot"},
        "spec": {
            "handles": ["purefulsoul"],
            "source": {"x": {"bearerTokenSecretRef": {"name": "x-api"}}},
            "output": {"s3": {"bucket": "tweetbot-artifacts"}},
        },
    }
    return merge(manifest, {"spec": spec_changes})


def merge(base: dict, patch: dict) -> dict:
    """JSON merge patch (RFC 7386): None deletes a key."""
    result = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


INVALID = [
    ("no handles", bot(handles=[]), "should have at least 1 items"),
    ("four handles", bot(handles=["a", "b", "c", "d"]), "must have at most 3 items"),
    ("handle with spaces", bot(handles=["elon musk"]), "spec.handles[0]: Invalid value"),
    ("same handle twice", bot(handles=["Alice", "@alice"]), "handles must be distinct"),
    ("two sources", bot(source={"mastodon": {"instanceUrl": "https://mastodon.social"}}),
     "set exactly one source of x, xArchive, mastodon, bluesky or file"),
    ("no source", bot(source={"x": None, "maxPostsPerHandle": 10}), "set exactly one source"),
    ("archive over ftp", bot(source={"x": None, "xArchive": {"uri": "ftp://host/tweets.js"}}),
     "uri must be s3://<bucket>/<key> or an http(s):// URL"),
    ("file that is not jsonl or csv", bot(source={"x": None, "file": {"uri": "s3://posts/alice.txt"}}),
     "ending in .jsonl or .csv"),
    ("name too long", merge(bot(), {"metadata": {"name": "a" * 41}}), "metadata.name must be at most 40 characters"),
    ("name with a dot", merge(bot(), {"metadata": {"name": "my.bot"}}), "metadata.name must be a DNS label"),
    ("zero learning rate", bot(training={"learningRate": 0}), "should be greater than 0"),
    ("unknown precision", bot(training={"precision": "int8"}), 'Unsupported value: "int8"'),
    ("DeepSpeed config twice", bot(training={"deepspeed": {"zeroStage": 3, "configMapRef": {"name": "ds"}}}),
     "set it or zeroStage/offload, not both"),
    ("negative GPUs", bot(resources={"gpus": -1}), "should be greater than or equal to 0"),
    ("unknown training method", bot(training={"method": "qlora"}), 'Unsupported value: "qlora"'),
    ("LoRA settings without method lora", bot(training={"lora": {"r": 8}}),
     "lora is read only with method lora; set method lora or remove lora"),
    ("LoRA rank 0", bot(training={"method": "lora", "lora": {"r": 0}}), "should be greater than or equal to 1"),
    ("LoRA rank too high", bot(training={"method": "lora", "lora": {"r": 257}}), "should be less than or equal to 256"),
    ("LoRA dropout 1", bot(training={"method": "lora", "lora": {"dropout": 1}}), "should be less than 1"),
    ("LoRA target module that is no module name", bot(training={"method": "lora", "lora": {"targetModules": ["q_proj", "a/b"]}}),
     "spec.training.lora.targetModules[1]: Invalid value"),
    ("all-linear with other target modules",
     bot(training={"method": "lora", "lora": {"targetModules": ["all-linear", "q_proj"]}}), "all-linear stands alone"),
    ("unknown LoRA publishing", bot(training={"method": "lora", "lora": {"publish": "both"}}), 'Unsupported value: "both"'),
    ("cron with four fields", bot(schedule={"cron": "0 4 * *"}), "spec.schedule.cron: Invalid value"),
    ("time zone with spaces", bot(schedule={"cron": "0 4 * * 1", "timeZone": "Europe/New York"}),
     "spec.schedule.timeZone: Invalid value"),
    ("schedule without cron", bot(schedule={"minNewPosts": 5}), "spec.schedule.cron: Required value"),
    ("resume from nothing", bot(schedule={"cron": "@daily x y z w", "resumeFrom": "last"}), 'Unsupported value: "last"'),
    ("resume from an adapter", bot(schedule={"cron": "0 4 * * 1", "resumeFrom": "previous"},
                                   training={"method": "lora", "lora": {"publish": "adapter"}}),
     "schedule.resumeFrom previous needs a whole model"),
    ("bucket with capitals", bot(output={"s3": {"bucket": "My_Bucket"}}), "bucket must be an S3 bucket name"),
    ("hub repo without org", bot(output={"hub": {"repoId": "nobody", "tokenSecretRef": {"name": "hf"}}}),
     "spec.output.hub.repoId: Invalid value"),
    ("hub without token", bot(output={"hub": {"repoId": "org/bot"}}), "spec.output.hub.tokenSecretRef: Required value"),
    ("checkpoints to main", bot(output={"hub": {"tokenSecretRef": {"name": "hf"}, "checkpoints": True, "checkpointBranch": "main"}}),
     "checkpointBranch must not be main"),
    ("checkpoint branch with a slash", bot(output={"hub": {"tokenSecretRef": {"name": "hf"}, "checkpointBranch": "refs/x"}}),
     "spec.output.hub.checkpointBranch: Invalid value"),
    ("checkpoint branch with '..'", bot(output={"hub": {"tokenSecretRef": {"name": "hf"}, "checkpointBranch": "a..b"}}),
     "checkpointBranch must be a git branch name"),
    ("validation share too big", bot(data={"validationFraction": 0.9}), "should be less than or equal to 0.5"),
    ("unknown deletion policy", bot(deletionPolicy="Keep"), 'Unsupported value: "Keep"'),
    ("no output", bot(output=None), "spec.output: Required value"),
    ("Kueue queue name not a DNS label", bot(resources={"queueName": "Team_A"}), "spec.resources.queueName"),
    # What the operator would send to the API server or S3 as part of a path or host.
    ("Secret name that walks to another namespace",
     bot(source={"x": {"bearerTokenSecretRef": {"name": "../../kube-system/secrets/aws-creds"}}}),
     "spec.source.x.bearerTokenSecretRef.name: Invalid value"),
    ("empty credentials Secret name", bot(output={"s3": {"credentialsSecretRef": {"name": ""}}}),
     "spec.output.s3.credentialsSecretRef.name: Invalid value"),
    ("Secret key with a slash", bot(output={"hub": {"tokenSecretRef": {"name": "hf", "key": "a/b"}}}),
     "spec.output.hub.tokenSecretRef.key: Invalid value"),
    ("ConfigMap name with capitals", bot(training={"deepspeed": {"configMapRef": {"name": "DS"}}}),
     "spec.training.deepspeed.configMapRef.name: Invalid value"),
    ("nested prefix", bot(output={"s3": {"prefix": "tweetbot/team-b"}}), "spec.output.s3.prefix: Invalid value"),
    ("empty prefix", bot(output={"s3": {"prefix": ""}}), "spec.output.s3.prefix: Invalid value"),
    ("region that is a host", bot(output={"s3": {"region": "x.evil.example/"}}), "spec.output.s3.region: Invalid value"),
    ("endpoint with credentials", bot(output={"s3": {"endpoint": "http://user:pass@minio:9000"}}),
     "spec.output.s3.endpoint: Invalid value"),
    # What the API server would refuse in the Job.
    ("TTL beyond int32", bot(ttlSecondsAfterFinished=2147483648), "should be less than or equal to 2147483647"),
    ("toleration Exists with a value", bot(resources={"tolerations": [{"key": "a", "operator": "Exists", "value": "b"}]}),
     "a toleration with operator Exists has no value"),
    ("toleration without key or Exists", bot(resources={"tolerations": [{"operator": "Equal", "value": "b"}]}),
     "a toleration without a key must have operator Exists"),
    ("tolerationSeconds without NoExecute",
     bot(resources={"tolerations": [{"key": "a", "effect": "NoSchedule", "tolerationSeconds": 5}]}),
     "tolerationSeconds applies to effect NoExecute only"),
    ("node selector key that is no label key", bot(resources={"nodeSelector": {"bad key!": "x"}}),
     "nodeSelector keys must be label keys"),
    ("node selector value that is no label value", bot(resources={"nodeSelector": {"gpu": "a b"}}),
     "spec.resources.nodeSelector.gpu: Invalid value"),
    # Experiment trackers: their settings when named, and only http(s) hosts without userinfo for their keys.
    ("wandb without its settings", bot(training={"reportTo": ["wandb"]}), "reportTo lists wandb; set training.wandb"),
    ("mlflow without its settings", bot(training={"reportTo": ["mlflow"]}), "reportTo lists mlflow; set training.mlflow"),
    ("unknown tracker", bot(training={"reportTo": ["comet"]}), 'Unsupported value: "comet"'),
    ("tracker twice", bot(training={"reportTo": ["tensorboard", "tensorboard"]}), "Duplicate value"),
    ("wandb without an API key", bot(training={"reportTo": ["wandb"], "wandb": {"project": "p"}}),
     "spec.training.wandb.apiKeySecretRef: Required value"),
    ("MLflow URI that is no http(s) URL", bot(training={"reportTo": ["mlflow"], "mlflow": {"trackingUri": "file:///tmp/x"}}),
     "spec.training.mlflow.trackingUri: Invalid value"),
    ("W&B host with userinfo", bot(training={"reportTo": ["wandb"], "wandb": {
        "host": "https://wandb.example@evil.example", "apiKeySecretRef": {"name": "w"}}}), "spec.training.wandb.host: Invalid value"),
    ("priority class not a DNS subdomain", bot(resources={"priorityClassName": "High_Priority"}),
     "spec.resources.priorityClassName: Invalid value"),
    # spec.podOverrides: plain env the operator does not set itself, labels it does not own, names Kubernetes takes.
    ("env the operator sets", bot(podOverrides={"train": {"env": [{"name": "HF_TOKEN", "value": "x"}]}}),
     "env name is set by the operator"),
    ("env of the S3 identity", bot(podOverrides={"scrape": {"env": [{"name": "AWS_ENDPOINT_URL", "value": "http://x"}]}}),
     "env name is set by the operator"),
    # Names outside the allow-list: each runs code the admin did not choose in the stage's Python.
    ("env that imports a module", bot(podOverrides={"train": {"env": [{"name": "PYTHONWARNINGS", "value": "ignore::antigravity.x"}]}}),
     "env name is not one a stage may be given"),
    ("env that preloads a library", bot(podOverrides={"train": {"env": [{"name": "LD_PRELOAD", "value": "/tmp/x.so"}]}}),
     "env name is not one a stage may be given"),
    ("env that runs a command", bot(podOverrides={"scrape": {"env": [{"name": "BROWSER", "value": "sh -c id"}]}}),
     "env name is not one a stage may be given"),
    ("env of an allowed family naming a plugin", bot(podOverrides={"train": {"env": [{"name": "NCCL_NET_PLUGIN", "value": "/tmp/x.so"}]}}),
     "env name is not one a stage may be given"),
    ("env name that is no variable name", bot(podOverrides={"train": {"env": [{"name": "1X", "value": "x"}]}}),
     "spec.podOverrides.train.env[0].name: Invalid value"),
    ("env twice", bot(podOverrides={"train": {"env": [{"name": "NCCL_DEBUG", "value": "x"}, {"name": "NCCL_DEBUG", "value": "y"}]}}),
     "Duplicate value"),
    ("env from a Secret", bot(podOverrides={"train": {"env": [{"name": "NCCL_DEBUG", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}}),
     'unknown field "spec.podOverrides.train.env[0].valueFrom"'),
    ("operator's label", bot(podOverrides={"publish": {"labels": {"app.kubernetes.io/component": "train"}}}),
     "labels must not set the operator's own"),
    ("Kueue label on a pod", bot(podOverrides={"train": {"labels": {"kueue.x-k8s.io/queue-name": "other"}}}),
     "labels must not set the operator's own"),
    ("label value with a space", bot(podOverrides={"train": {"labels": {"team": "a b"}}}),
     "spec.podOverrides.train.labels.team: Invalid value"),
    ("annotation key that is no qualified name", bot(podOverrides={"train": {"annotations": {"a/b/c": "x"}}}),
     "annotation keys must be qualified names"),
    ("operator's annotation", bot(podOverrides={"train": {"annotations": {"huggingtweets.dev/rerun": "x"}}}),
     "annotations of huggingtweets.dev/ and batch.kubernetes.io/ are the operator's own"),
    ("pull Secret that walks elsewhere", bot(podOverrides={"scrape": {"imagePullSecrets": [{"name": "../x"}]}}),
     "spec.podOverrides.scrape.imagePullSecrets[0].name: Invalid value"),
    ("RuntimeClass with capitals", bot(podOverrides={"train": {"runtimeClassName": "Kata_QEMU"}}),
     "spec.podOverrides.train.runtimeClassName: Invalid value"),
    ("image with a space", bot(podOverrides={"train": {"image": "trainer latest"}}), "spec.podOverrides.train.image: Invalid value"),
    ("GPU resource without a domain", bot(podOverrides={"train": {"gpuResourceName": "gpu"}}),
     "spec.podOverrides.train.gpuResourceName: Invalid value"),
    ("GPU resource of Kubernetes' own", bot(podOverrides={"train": {"gpuResourceName": "kubernetes.io/gpu"}}),
     "gpuResourceName must be a vendor's extended resource"),
    ("GPU resource of the scrape stage", bot(podOverrides={"scrape": {"gpuResourceName": "amd.com/gpu"}}),
     'unknown field "spec.podOverrides.scrape.gpuResourceName"'),
    ("affinity of another kind", bot(podOverrides={"train": {"affinity": {"gpuAffinity": {}}}}),
     'unknown field "spec.podOverrides.train.affinity.gpuAffinity"'),
]


@pytest.mark.parametrize("manifest, message", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_bots_are_refused_at_apply(kubectl, namespace, manifest, message):
    result = kubectl("apply", "-n", namespace, "-f", "-", manifest=manifest)
    assert result.returncode != 0, f"accepted: {result.stdout}"
    assert message in result.stderr
    assert kubectl("get", "tweetbots", "-n", namespace, "-o", "name").stdout == ""


def test_defaults_are_filled_by_the_api_server(kubectl, namespace):
    created = kubectl("apply", "-n", namespace, "-o", "json", "-f", "-", manifest=bot(handles=["@PurefulSoul"]))
    assert created.returncode == 0, created.stderr
    spec = json.loads(created.stdout)["spec"]
    assert spec["handles"] == ["@PurefulSoul"]  # normalised by the operator, not rewritten by the schema
    assert spec["training"]["learningRate"] == pytest.approx(1.372e-4)
    assert spec["training"]["lrScheduler"] == "cosine" and spec["training"]["epochs"] == 4
    assert spec["data"] == {"dropRetweets": True, "dropShortPosts": True, "keepReplies": True, "dedupe": False,
                            "minWords": 3, "validationFraction": 0.1, "balanceHandles": False}
    assert spec["source"]["maxPostsPerHandle"] == 3200
    assert spec["source"]["x"]["bearerTokenSecretRef"]["key"] == "token"
    assert spec["model"] == {"name": "gpt2", "revision": "main"}
    assert spec["training"]["method"] == "full" and "lora" not in spec["training"]
    assert spec["deletionPolicy"] == "Retain" and spec["suspend"] is False
    assert "reportTo" not in spec["training"] and "wandb" not in spec["training"]
    assert "schedule" not in spec and spec["historyLimit"] == 10
    # The operator fills in the same defaults where a cluster's CRD is older than it.
    assert spec == SPEC_DEFAULTS.apply(bot(handles=["@PurefulSoul"])["spec"])

    scheduled = bot(handles=["b"], schedule={"cron": "0 4 * * 1", "timeZone": "Europe/Paris"})
    created = kubectl("apply", "-n", namespace, "-o", "json", "-f", "-", manifest=merge(scheduled, {"metadata": {"name": "weekly"}}))
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["spec"]["schedule"] == {"cron": "0 4 * * 1", "timeZone": "Europe/Paris", "suspend": False,
                                                             "minNewPosts": 1, "resumeFrom": "base"}
    assert json.loads(created.stdout)["spec"] == SPEC_DEFAULTS.apply(scheduled["spec"])


def test_pod_overrides_are_kept_as_written_and_the_gpu_resource_defaulted(kubectl, namespace):
    overrides = {"train": {"gpuResourceName": "nvidia.com/mig-1g.10gb", "runtimeClassName": "nvidia",
                           "env": [{"name": "NCCL_DEBUG", "value": "INFO"},
                                   {"name": "PYTORCH_CUDA_ALLOC_CONF", "value": "expandable_segments:True"}],
                           "imagePullSecrets": [{"name": "registry"}],
                           "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                               "nodeSelectorTerms": [{"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In",
                                                                            "values": ["NVIDIA-A100-SXM4-80GB"]}]}]}}},
                           "labels": {"cost-center": "research"},
                           "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}},
                 "scrape": {"image": "registry.example/trainer:patched", "env": [{"name": "HTTPS_PROXY", "value": ""}]}}
    created = kubectl("apply", "-n", namespace, "-o", "json", "-f", "-", manifest=bot(podOverrides=overrides))
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["spec"]["podOverrides"] == overrides
    plain = kubectl("apply", "-n", namespace, "-o", "json", "-f", "-",
                    manifest=merge(bot(podOverrides={"publish": {"runtimeClassName": "gvisor"}}), {"metadata": {"name": "plain"}}))
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["spec"]["podOverrides"] == {"publish": {"runtimeClassName": "gvisor"},
                                                                "train": {"gpuResourceName": "nvidia.com/gpu"}}


@pytest.mark.parametrize("training, lora", [
    ({"method": "lora"}, None),  # the trainer fills in the defaults
    ({"method": "lora", "lora": {"r": 16, "targetModules": ["all-linear"]}},
     {"r": 16, "alpha": 16, "dropout": 0.05, "publish": "merged", "targetModules": ["all-linear"]}),
])
def test_lora_settings_get_their_defaults_only_where_given(kubectl, namespace, training, lora):
    created = kubectl("apply", "-n", namespace, "-o", "json", "-f", "-", manifest=bot(training=training))
    assert created.returncode == 0, created.stderr
    spec = json.loads(created.stdout)["spec"]
    assert spec["training"]["method"] == "lora" and spec["training"].get("lora") == lora
    assert spec == SPEC_DEFAULTS.apply(bot(training=training)["spec"])


def test_printer_columns_and_short_name(kubectl, namespace):
    assert kubectl("apply", "-n", namespace, "-f", "-", manifest=bot(handles=["a", "b"])).returncode == 0
    table = kubectl("get", "tb", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert table[0].split() == ["NAME", "HANDLES", "PHASE", "PROGRESS", "READY", "HUB", "NEXT", "AGE"]
    assert table[1].split()[:2] == ["valid-bot", '["a","b"]']


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda path: path.name)
def test_examples_apply_cleanly(kubectl, namespace, example):
    for document in yaml.safe_load_all(example.read_text()):
        if document and document.get("kind") == "TweetBot":
            result = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", manifest=document)
            assert result.returncode == 0, result.stderr
