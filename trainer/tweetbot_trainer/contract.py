"""The one contract between the operator and the stage Jobs, imported by both (standard library only).

The operator hands a stage a `StageRequest` (JSON in the `TWEETBOT_REQUEST` variable; secrets arrive as
separate variables filled from Kubernetes Secrets, never inside the request). The stage hands back a
`StageResult` as its container's termination message, which the operator reads from the pod status, so
stage pods need no rights on the Kubernetes API. Both carry `CONTRACT_VERSION`; a side refuses a version
it does not know with a message naming both versions.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

CONTRACT_VERSION = 1

STAGES = ("scrape", "train", "publish")
MAX_HANDLES = 3  # huggingtweets' limit; the CRD's spec.handles maxItems says the same

# Labels on every stage Job and pod.
GROUP = "huggingtweets.dev"
BOT_LABEL = f"{GROUP}/bot"
RUN_LABEL = f"{GROUP}/run"
STAGE_LABEL = f"{GROUP}/stage"

REQUEST_ENV = "TWEETBOT_REQUEST"
# Where the train pod finds a user's complete DeepSpeed config (spec.training.deepspeed.configMapRef).
DEEPSPEED_CONFIG_PATH = "/etc/tweetbot/deepspeed/ds_config.json"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
# Where the train pod finds the base-model cache the chart configures (trainer.modelCache), when the operator
# mounts it; huggingface_hub's cache of each Hub endpoint is a directory under it.
MODEL_CACHE_PATH = "/var/cache/tweetbot/models"
TERMINATION_MESSAGE_LIMIT = 4096  # bytes the kubelet keeps of a container's termination message

# Where each secret reaches the stage container (environment variables filled by secretKeyRef).
X_BEARER_TOKEN_ENV = "X_BEARER_TOKEN"
MASTODON_TOKEN_ENV = "MASTODON_ACCESS_TOKEN"
HUB_TOKEN_ENV = "HF_TOKEN"
# The output repository's token in the train stage, which pushes checkpoints to it. Not HF_TOKEN: there that
# names the base model's read token, which huggingface_hub sends on every download, to whatever host serves it.
HUB_PUSH_TOKEN_ENV = "TWEETBOT_HUB_PUSH_TOKEN"
S3_ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
S3_SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
WANDB_API_KEY_ENV = "WANDB_API_KEY"
MLFLOW_TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"

# What a bot's spec.podOverrides.<stage>.env may not set: the variables the operator and the trainer set
# themselves (the request, the secrets, a gang's rendezvous, the process group, the thread count), every AWS_
# one (the S3 endpoint and identity are the chart's and spec.output.s3's to choose), and those that would move
# a token to a host the spec's checked fields did not name (the Hub endpoint, the W&B host, the MLflow URI).
# Refused before the allow-list below, with a message of their own. The CRD's rule lists the same (tests hold them
# to it).
RESERVED_ENV_PREFIXES = ("TWEETBOT_", "PET_", "AWS_")
RESERVED_ENV_NAMES = (X_BEARER_TOKEN_ENV, MASTODON_TOKEN_ENV, HUB_TOKEN_ENV, WANDB_API_KEY_ENV, MLFLOW_TOKEN_ENV,
                      "HF_ENDPOINT", "WANDB_BASE_URL", "MLFLOW_TRACKING_URI", "OMP_NUM_THREADS", "DS_ACCELERATOR",
                      "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# What spec.podOverrides.<stage>.env may set: an allow-list, because a variable can make the admin's image run code
# of the bot author's choosing with the bot's Secrets in its environment (trainer.allowBotImages: false promises it
# does not): PYTHONWARNINGS imports the module a filter names, webbrowser runs BROWSER, LD_PRELOAD loads a library,
# TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD has torch.load unpickle a checkpoint, TORCH_LOGS imports the modules it names,
# CUDA_INJECTION64_PATH is a library the driver loads, NVIDIA_VISIBLE_DEVICES can give the container every GPU
# of the node. The names below tune training and only that: each was read in its library (NCCL 2.30, torch 2.15,
# huggingface_hub 2.4, hf_xet 1.8, wandb 0.31, mlflow 3.18) for what its value is. A family is allowed by prefix only
# where it is large and made of tuning knobs, less each name with a word of LOADING_ENV_WORD; the CRD's rule lists
# the same (tests hold them to it). Another need is one more line here, after the same reading.
ALLOWED_ENV_PREFIXES = (
    "NCCL_",  # NCCL's transports, algorithms and debug output: a cluster's network is told to it this way
    "TORCH_NCCL_",  # torch's NCCL process group: error handling, timeouts, the flight recorder's size
    "HF_HUB_",  # huggingface_hub's timeouts, offline mode, progress bars, telemetry
    "FI_EFA_",  # libfabric's EFA provider (AWS), where the image has the aws-ofi-nccl plugin
    "LC_",  # locale categories: data files, never code
)
ALLOWED_ENV_NAMES = (
    # CUDA and PyTorch's allocator and diagnostics.
    "CUDA_LAUNCH_BLOCKING", "CUDA_DEVICE_MAX_CONNECTIONS", "CUDA_MODULE_LOADING", "CUDA_DEVICE_ORDER",
    "CUBLAS_WORKSPACE_CONFIG", "NVIDIA_TF32_OVERRIDE", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF",
    "PYTORCH_HIP_ALLOC_CONF", "PYTORCH_NO_CUDA_MEMORY_CACHING", "TORCH_DISTRIBUTED_DEBUG",
    "TORCH_SHOW_CPP_STACKTRACES", "TORCH_CPP_LOG_LEVEL",
    # CPU threads (OMP_NUM_THREADS is the operator's). Not OMP_TOOL_LIBRARIES: libraries the OpenMP runtime loads.
    "OMP_PROC_BIND", "OMP_PLACES", "OMP_SCHEDULE", "OMP_STACKSIZE", "OMP_WAIT_POLICY", "OMP_DYNAMIC",
    "OMP_MAX_ACTIVE_LEVELS", "OMP_THREAD_LIMIT", "OMP_DISPLAY_ENV", "OMP_DISPLAY_AFFINITY",
    "MKL_NUM_THREADS", "MKL_DYNAMIC", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
    "KMP_AFFINITY", "KMP_BLOCKTIME", "KMP_HW_SUBSET", "KMP_SETTINGS",
    # Gloo's interface (torch's CPU collectives) and libfabric's provider.
    "GLOO_SOCKET_IFNAME", "FI_PROVIDER", "FI_LOG_LEVEL",
    # The Hub's transfers and transformers' output. Not HF_HOME or any cache: the base-model cache is shared.
    "HF_XET_HIGH_PERFORMANCE", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    # The trackers' labels, timeouts and output. Not their families: every WANDB_<setting> reaches wandb's
    # settings (WANDB_X_EXECUTABLE, a proxy, a directory), and MLFLOW_ has pickle loading and S3 endpoints.
    "WANDB_MODE", "WANDB_TAGS", "WANDB_NOTES", "WANDB_RUN_GROUP", "WANDB_JOB_TYPE", "WANDB_SILENT", "WANDB_QUIET",
    "WANDB_DISABLE_CODE", "WANDB_DISABLE_GIT", "WANDB_INIT_TIMEOUT", "WANDB_HTTP_TIMEOUT",
    "MLFLOW_TAGS", "MLFLOW_FLATTEN_PARAMS", "MLFLOW_MAX_LOG_PARAMS", "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING",
    "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL",
    # Time zone, locale and an egress proxy. Not HTTP_PROXY: a proxy of the bot's choosing would see and could
    # answer plain-http traffic (a Hub mirror's downloads into the shared base-model cache, an http S3 endpoint).
    "TZ", "LANG", "LANGUAGE", "HTTPS_PROXY", "NO_PROXY",
)
# A word of a name in an allowed family that says its value is a file, directory, library, plugin, command or
# host, which the process would load, run, write or send to: NCCL_NET_PLUGIN, NCCL_IBVERBS_LIB, NCCL_CONF_FILE (it
# sets other variables), NCCL_DEBUG_FILE, HF_HUB_CACHE. Refused in every family, with names a library adds later.
LOADING_ENV_WORDS = ("PATH", "PATHS", "FILE", "FILES", "FILENAME", "DIR", "DIRS", "HOME", "ROOT", "LIB", "LIBS",
                     "LIBRARY", "LIBRARIES", "PLUGIN", "PLUGINS", "MODULE", "MODULES", "CACHE", "PRELOAD", "CMD",
                     "COMMAND", "EXEC", "EXECUTABLE", "SCRIPT", "HOOK", "HOOKS", "URL", "URI", "ENDPOINT", "HOST")
LOADING_ENV_WORD = f"(^|_)({'|'.join(LOADING_ENV_WORDS)})(_|$)"  # the same regex in Python and the CRD's CEL (RE2)


def env_reserved(name: str) -> bool:
    """A variable the operator or the trainer sets, which spec.podOverrides.<stage>.env may not."""
    return name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES)


def env_allowed(name: str) -> bool:
    """A variable spec.podOverrides.<stage>.env may set: one of the names, or of a family less its loading words."""
    return name in ALLOWED_ENV_NAMES or (name.startswith(ALLOWED_ENV_PREFIXES)
                                         and re.search(LOADING_ENV_WORD, name) is None)


# The extended resource a training pod's GPUs are asked for by, unless spec.podOverrides.train says another
# (a MIG slice such as nvidia.com/mig-1g.10gb, amd.com/gpu).
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"

# spec.training.reportTo's trackers; the CRD's enum follows this (tests hold them to it).
TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass(frozen=True)
class SecretUse:
    """A Secret key a stage reads: the spec's `...SecretRef` field that names it, and the variable it fills."""

    field: str
    env: str


# Every post source: spec.source.<key>, and the Secret its scrape reads (None: public). The CRD's source
# list, the operator's Secret needs and the trainer's clients follow this table (tests hold them to it).
SOURCES: dict[str, SecretUse | None] = {
    "x": SecretUse("bearerTokenSecretRef", X_BEARER_TOKEN_ENV),
    "xArchive": None,
    "mastodon": SecretUse("accessTokenSecretRef", MASTODON_TOKEN_ENV),
    "bluesky": None,
    "file": None,
}


@dataclass(frozen=True)
class Defaults:
    """The defaults inside one object of a TweetBot's spec, as the CRD's `default:` values give them.
    `always`: the CRD defaults the object itself to {}, so its fields' defaults apply when it is left out."""

    fields: dict[str, Any]
    always: bool = False

    def apply(self, value: dict | None) -> dict | None:
        """`value` with every default the API server would fill in; None stays None unless `always`."""
        if value is None and not self.always:
            return None
        filled = dict(value or {})
        for key, default in self.fields.items():
            if isinstance(default, Defaults):
                child = default.apply(filled.get(key))
                if child is not None:
                    filled[key] = child
            elif filled.get(key) is None:
                filled[key] = default
        return filled


_SECRET_KEY = Defaults({"key": "token"})
# The one place the spec's defaults are written; `tests/test_crd.py` holds the CRD's `default:` values to it.
SPEC_DEFAULTS = Defaults({
    "source": Defaults({
        "x": Defaults({"bearerTokenSecretRef": _SECRET_KEY, "apiUrl": "https://api.x.com"}),
        "mastodon": Defaults({"accessTokenSecretRef": _SECRET_KEY}),
        "bluesky": Defaults({"appViewUrl": "https://public.api.bsky.app"}),
        "maxPostsPerHandle": 3200,
    }),
    "data": Defaults({"dropRetweets": True, "dropShortPosts": True, "keepReplies": True, "dedupe": False,
                      "minWords": 3, "validationFraction": 0.1, "balanceHandles": False}, always=True),
    "model": Defaults({"name": "gpt2", "revision": "main", "tokenSecretRef": _SECRET_KEY}, always=True),
    "training": Defaults({
        "epochs": 4, "learningRate": 1.372e-4, "lrScheduler": "cosine", "batchSize": 4, "blockSize": 512,
        "seed": 42, "precision": "auto", "method": "full",
        # Not `always`: the CRD refuses a lora block unless method is lora; the trainer fills it in then.
        "lora": Defaults({"r": 8, "alpha": 16, "dropout": 0.05, "publish": "merged"}),
        "deepspeed": Defaults({"configMapRef": Defaults({"key": "ds_config.json"})}, always=True),
        "checkpoint": Defaults({"everyMinutes": 10, "keep": 2}, always=True),
        "wandb": Defaults({"project": "tweetbot", "apiKeySecretRef": Defaults({"key": "apiKey"})}),
        "mlflow": Defaults({"experiment": "tweetbot", "tokenSecretRef": _SECRET_KEY}),
    }, always=True),
    "resources": Defaults({"gpus": 1, "nodes": 1, "cpu": "4", "memory": "16Gi"}, always=True),
    "podOverrides": Defaults({"train": Defaults({"gpuResourceName": DEFAULT_GPU_RESOURCE}, always=True)}, always=True),
    "output": Defaults({
        "s3": Defaults({"prefix": "tweetbot", "region": "us-east-1"}),
        "hub": Defaults({"private": False, "tokenSecretRef": _SECRET_KEY, "checkpoints": False,
                         "checkpointBranch": "checkpoints"}),
    }),
    # Re-training on new posts, like a CronJob: cron (and timeZone) have no default.
    "schedule": Defaults({"suspend": False, "minNewPosts": 1, "resumeFrom": "base"}),
    "deletionPolicy": "Retain",
    "suspend": False,
    "backoffLimit": 2,
    "historyLimit": 10,
}, always=True)


def section_defaults(section: str, value: dict | None) -> dict:
    """One top-level section of a spec (`data`, `training`, ...) with its defaults filled in."""
    return SPEC_DEFAULTS.fields[section].apply(value) or {}


class ContractError(ValueError):
    """A request or result that this side of the contract cannot accept."""


def _check_version(payload: dict, what: str) -> None:
    version = payload.get("version")
    if version != CONTRACT_VERSION:
        raise ContractError(
            f"{what} uses contract version {version!r}, this side speaks version {CONTRACT_VERSION}: "
            "run matching operator and trainer images"
        )


def _load(text: str, what: str) -> dict:
    """Parse one side's JSON message and check its contract version."""
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        raise ContractError(f"{what} is not a JSON object")
    _check_version(payload, what)
    return payload


def _from_dict(cls, payload: dict):
    known = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in payload.items() if key in known})


@dataclass(frozen=True)
class S3Layout:
    """Where one run's artifacts live: s3://<bucket>/<prefix>/<namespace>/<bot>/<run>/..."""

    bucket: str
    prefix: str
    namespace: str
    bot: str
    run_id: str
    endpoint: str = ""
    region: str = "us-east-1"

    @property
    def bot_prefix(self) -> str:
        """Every run of the bot is under it. The operator allows only one segment for the prefix, and names
        have no '/', so no two bots' prefixes nest (a run by hand may leave the names out)."""
        return "/".join(part for part in (self.prefix, self.namespace, self.bot) if part)

    @property
    def run_prefix(self) -> str:
        return "/".join(part for part in (self.bot_prefix, self.run_id) if part)

    def key(self, *parts: str) -> str:
        return "/".join((self.run_prefix, *parts))

    def uri(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}"

    # The stages' artifacts, each written last-manifest-wins so a re-run or resume is safe.
    @property
    def dataset(self) -> str:
        return self.key("data", "dataset.jsonl")

    @property
    def stats(self) -> str:
        return self.key("data", "stats.json")

    @property
    def posts(self) -> str:
        """Every post fetched for the run, newest first per handle, before cleaning: what a scheduled run's
        scrape extends with newer posts (private, like the dataset)."""
        return self.key("data", "posts.jsonl")

    def of_run(self, run_id: str) -> S3Layout:
        """The same bot's layout for another of its runs."""
        return replace(self, run_id=run_id)

    @property
    def checkpoints(self) -> str:
        return self.key("checkpoints") + "/"

    @property
    def final_model(self) -> str:
        return self.key("final") + "/"

    @property
    def progress(self) -> str:
        return self.key("train", "progress.json")

    @property
    def tensorboard(self) -> str:
        """TensorBoard's event files, so `tensorboard --logdir s3://<bucket>/<this>` shows the run."""
        return self.key("tensorboard") + "/"


@dataclass(frozen=True)
class StageRequest:
    stage: str
    run_id: str
    namespace: str
    bot: str
    handles: list[str]
    s3: S3Layout
    source: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    hub: dict[str, Any] | None = None
    gpus: int = 0
    # A scheduled run's lineage, runs of the same bot and spec: the scrape adds the posts newer than those of
    # `extends_run` to them; the train stage starts from `starts_from_run`'s model instead of spec.model's.
    extends_run: str = ""
    starts_from_run: str = ""
    version: int = CONTRACT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> StageRequest:
        payload = _load(text, f"the stage request ({REQUEST_ENV})")
        if payload.get("stage") not in STAGES:
            raise ContractError(f"unknown stage {payload.get('stage')!r}; expected one of {', '.join(STAGES)}")
        payload["s3"] = _from_dict(S3Layout, payload.get("s3") or {})
        return _from_dict(cls, payload)


@dataclass(frozen=True)
class Progress:
    """Live training progress, overwritten in S3 (`S3Layout.progress`) as training goes; the operator
    copies it into the bot's status, so trainer pods need no rights on the Kubernetes API."""

    step: int
    total_steps: int
    loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: int | None = None
    updated_at: str | None = None  # when the trainer wrote it (UTC, RFC 3339): a report that stopped is not live
    version: int = CONTRACT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Progress:
        return _from_dict(cls, _load(text, "the progress report"))

    @property
    def percent(self) -> int:
        return min(100, int(100 * self.step / self.total_steps)) if self.total_steps else 0


@dataclass(frozen=True)
class HandleStats:
    """huggingtweets' per-handle table; downloaded = retweets + short + kept always holds."""

    handle: str
    downloaded: int
    retweets: int
    short: int
    kept: int
    displayName: str = ""

    def __post_init__(self):
        if self.downloaded != self.retweets + self.short + self.kept:
            raise ContractError(
                f"stats for {self.handle} do not add up: downloaded {self.downloaded} != "
                f"retweets {self.retweets} + short {self.short} + kept {self.kept}"
            )


@dataclass(frozen=True)
class StageResult:
    """What a stage reports back: its stats, metrics and artifact locations, or why it failed."""

    stage: str
    run_id: str
    ok: bool = True
    error: str = ""
    data: list[HandleStats] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    version: int = CONTRACT_VERSION

    def to_termination_message(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
            raise ContractError(f"stage result is {len(text.encode())} bytes; the limit is {TERMINATION_MESSAGE_LIMIT}")
        return text

    @classmethod
    def from_termination_message(cls, text: str) -> StageResult:
        payload = _load(text, "the stage result")
        payload["data"] = [_from_dict(HandleStats, item) for item in payload.get("data") or []]
        return _from_dict(cls, payload)
