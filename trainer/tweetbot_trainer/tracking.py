"""Experiment tracking (spec.training.reportTo): TensorBoard event files in S3, Weights & Biases and MLflow runs.

transformers' own callbacks (TensorBoardCallback, WandbCallback, MLflowCallback) log the losses and evaluations,
on rank 0 only. This module sets their environment from the spec, starts the W&B and MLflow runs itself before
the Trainer exists (so a tracker that cannot be reached fails the stage before the model loads, and the callbacks
reuse those runs instead of starting their own), logs the sample generations, and ends the runs with their URLs.

A tracker that fails once training is under way never fails the stage: the model matters more than its charts.
Messages name the tracker and the spec field to check, never a key, and never a library's own message (which can
carry request URLs).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .contract import MLFLOW_TOKEN_ENV, TRACKERS, WANDB_API_KEY_ENV, S3Layout, StageRequest, section_defaults
from .errors import TrackerUnavailable, redact_url
from .storage import Storage

log = logging.getLogger("tweetbot.train")
SAMPLES_KEY = "samples"
MLFLOW_TAG_LIMIT = 5000  # characters of a tag value MLflow keeps (8,000 on its servers; some stores 5,000)


@dataclass(frozen=True)
class Tracking:
    """The trackers a run reports to, and their settings (the spec's, defaults filled in)."""

    report_to: tuple[str, ...]
    run_name: str
    wandb: dict = field(default_factory=dict)
    mlflow: dict = field(default_factory=dict)

    @classmethod
    def from_request(cls, request: StageRequest) -> Tracking:
        training = section_defaults("training", request.training)
        report_to = tuple(tracker for tracker in TRACKERS if tracker in (training.get("reportTo") or []))
        return cls(report_to, run_name(request), training.get("wandb") or {}, training.get("mlflow") or {})


def run_name(request: StageRequest) -> str:
    """`<namespace>/<bot>/<run>`; a run by hand has no namespace or bot."""
    return "/".join(part for part in (request.namespace, request.bot, request.run_id) if part)


def wandb_run_id(name: str) -> str:
    """The same W&B run for every launch of a TweetBot run, so a pod resumed from a checkpoint goes on with its
    charts: W&B ids allow no '/', and a digest stays within their length limit whatever the names' lengths."""
    return "tweetbot-" + hashlib.sha256(name.encode()).hexdigest()[:16]


def tracker_environment(tracking: Tracking, workdir: Path, environ: dict[str, str]) -> dict[str, str]:
    """The variables transformers' callbacks and the trackers' clients read, from the spec.

    Files go under the work directory: the root filesystem is read-only and HOME (/tmp) is shared with the
    other stages' leftovers. The tracking URI and W&B's directory already in the environment win: the operator
    sets neither, so they only serve runs by hand and tests (a `file:` MLflow store, offline W&B files kept)."""
    env = {"TENSORBOARD_LOGGING_DIR": str(workdir / "tensorboard")}
    if "wandb" in tracking.report_to:
        wandb = tracking.wandb
        env.update(WANDB_PROJECT=wandb["project"], WANDB_DIR=environ.get("WANDB_DIR") or str(workdir),
                   WANDB_CONFIG_DIR=str(workdir / "wandb-config"), WANDB_CACHE_DIR=str(workdir / "wandb-cache"),
                   WANDB_DATA_DIR=str(workdir / "wandb-data"), WANDB_LOG_MODEL="false", WANDB_WATCH="false")
        env.update({name: wandb[key] for name, key in (("WANDB_ENTITY", "entity"), ("WANDB_BASE_URL", "host")) if wandb.get(key)})
    if "mlflow" in tracking.report_to:
        # No MLflow artifacts at all: a run's artifact store is the server's choice, and one at s3:// would have
        # the client sign its uploads with the pod's S3 credentials (AWS_ACCESS_KEY_ID here: the bot's, or the
        # operator's own identity) towards a bucket and endpoint the tenant picked. Metrics, parameters and tags
        # go to the tracking server alone, with the tenant's own token.
        env.update(MLFLOW_TRACKING_URI=environ.get("MLFLOW_TRACKING_URI") or tracking.mlflow["trackingUri"],
                   MLFLOW_EXPERIMENT_NAME=tracking.mlflow["experiment"], HF_MLFLOW_LOG_ARTIFACTS="FALSE")
    return env


class Trackers:
    """The runs of one training on rank 0: started before training, given the samples after, ended with their URLs."""

    def __init__(self, tracking: Tracking, workdir: Path):
        self.tracking, self.workdir = tracking, workdir
        self.wandb_run = None
        self.mlflow_run = None
        self.urls: dict[str, str] = {}

    @property
    def tensorboard_dir(self) -> Path:
        return self.workdir / "tensorboard"

    def start(self) -> None:
        if "wandb" in self.tracking.report_to:
            self._start_wandb()
        if "mlflow" in self.tracking.report_to:
            self._start_mlflow()

    def _start_wandb(self) -> None:
        import wandb

        settings = self.tracking.wandb
        where = f"project {settings['project']!r} at {redact_url(settings.get('host') or 'https://api.wandb.ai')}"
        if os.environ.get("WANDB_MODE") not in ("offline", "disabled") and not os.environ.get(WANDB_API_KEY_ENV):
            raise TrackerUnavailable(f"no W&B API key: {WANDB_API_KEY_ENV} is empty (check spec.training.wandb.apiKeySecretRef)")
        try:
            # resume="allow": a relaunched pod continues the run it started; WandbCallback finds it in wandb.run.
            self.wandb_run = wandb.init(project=settings["project"], entity=settings.get("entity"), name=self.tracking.run_name,
                                        id=wandb_run_id(self.tracking.run_name), resume="allow",
                                        dir=os.environ.get("WANDB_DIR"), settings=wandb.Settings(console="off"))
        except Exception as error:
            raise TrackerUnavailable(f"cannot start the W&B run in {where} ({type(error).__name__}): check "
                                     "spec.training.wandb and the API key its apiKeySecretRef names") from None

    def _start_mlflow(self) -> None:
        import mlflow

        uri, experiment = os.environ["MLFLOW_TRACKING_URI"], self.tracking.mlflow["experiment"]
        try:
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(experiment)
            # A fresh run for each launch, of the same name: MLflowCallback logs the TrainingArguments as parameters,
            # and a relaunch's differ (its work directory), which MLflow refuses to change in an existing run.
            self.mlflow_run = mlflow.start_run(run_name=self.tracking.run_name)
        except Exception as error:
            token = " and the token its tokenSecretRef names" if os.environ.get(MLFLOW_TOKEN_ENV) else ""
            raise TrackerUnavailable(f"cannot start the MLflow run in experiment {experiment!r} at {redact_url(uri)} "
                                     f"({type(error).__name__}): check spec.training.mlflow{token}") from None

    def log_samples(self, prompt: str, samples: list[str], step: int) -> None:
        """The sample generations where each tracker shows text; a failure is a warning."""
        for tracker in self.tracking.report_to:
            try:
                getattr(self, f"_samples_to_{tracker}")(prompt, samples, step)
            except Exception as error:
                log.warning("samples not logged to %s (%s)", tracker, type(error).__name__)

    def _samples_to_tensorboard(self, prompt: str, samples: list[str], step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(self.tensorboard_dir)) as writer:
            # TensorBoard renders text as Markdown: each sample as a code block, so it shows as it was generated.
            writer.add_text(SAMPLES_KEY, "\n\n".join("    " + sample.replace("\n", "\n    ") for sample in samples), step)

    def _samples_to_wandb(self, prompt: str, samples: list[str], step: int) -> None:
        import wandb

        if self.wandb_run is not None:
            self.wandb_run.log({SAMPLES_KEY: wandb.Table(columns=["prompt", "generation"], data=[[prompt, s] for s in samples])})

    def _samples_to_mlflow(self, prompt: str, samples: list[str], step: int) -> None:
        import mlflow

        # As tags: mlflow.log_text and log_table write artifacts, which this stage never does (tracker_environment).
        if self.mlflow_run is not None:
            mlflow.set_tags({f"{SAMPLES_KEY}.{index}": sample[:MLFLOW_TAG_LIMIT] for index, sample in enumerate(samples)})

    def finish(self) -> dict[str, str]:
        """End the runs; the web pages of those that have one ({"wandb": url, "mlflow": url})."""
        if self.wandb_run is not None:
            try:
                if self.wandb_run.url:  # None offline
                    self.urls["wandb"] = self.wandb_run.url
                self.wandb_run.finish()
            except Exception as error:
                log.warning("the W&B run did not finish cleanly (%s)", type(error).__name__)
        if self.mlflow_run is not None:
            import mlflow

            try:
                info = self.mlflow_run.info
                uri = os.environ.get("MLFLOW_TRACKING_URI", "")
                if uri.startswith(("http://", "https://")):
                    self.urls["mlflow"] = f"{uri.rstrip('/')}/#/experiments/{info.experiment_id}/runs/{info.run_id}"
                mlflow.end_run()
            except Exception as error:
                log.warning("the MLflow run did not end cleanly (%s)", type(error).__name__)
        return self.urls


def upload_tensorboard(storage: Storage, layout: S3Layout, directory: Path) -> None:
    """The event files so far to S3 (`S3Layout.tensorboard`), where `tensorboard --logdir s3://...` reads them. Each
    upload overwrites the files whole: they are a few kB, and a file still being appended to is read up to its last
    complete record."""
    if not directory.is_dir():
        return
    try:
        storage.upload_directory(directory, layout.bucket, layout.tensorboard)
    except Exception as error:
        log.warning("TensorBoard events not uploaded (%s)", type(error).__name__)

