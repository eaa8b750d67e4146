"""The train stage: the scrape stage's dataset -> a fine-tuned causal LM in S3, with transformers + DeepSpeed.

Read top to bottom like transformers' run_clm.py: arguments, data, model, training, saving. Checkpoints go
to S3 in the background and a restarted pod resumes from the newest complete one; a failed upload stops
training at the next step, and local copies are deleted once S3 holds them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .contract import DEEPSPEED_CONFIG_PATH, Progress, S3Layout, StageRequest, StageResult
from .errors import BaseModelUnavailable, CheckpointUploadFailed, DatasetTooSmall, MissingInput, OutOfMemory, StageError
from .storage import S3Failure, Storage

log = logging.getLogger("tweetbot.train")
EOS = "<|endoftext|>"
SAMPLE_PROMPT = "My dream is"
# huggingtweets' generation settings, saved with the model so pipeline() uses them.
GENERATION_DEFAULTS = {"do_sample": True, "top_p": 0.95, "temperature": 1.0, "min_length": 10, "max_length": 160}


@dataclass
class TrainArguments:
    model_name: str = "gpt2"
    revision: str = "main"
    epochs: int = 4
    learning_rate: float = 1.372e-4
    lr_scheduler: str = "cosine"
    batch_size: int = 4
    block_size: int = 512
    seed: int = 42
    precision: str = "auto"
    zero_stage: int = 2
    offload: str = "none"
    validation_fraction: float = 0.1
    checkpoint_every_minutes: float = 10.0
    checkpoint_every_steps: int = 0  # 0: by time only
    keep_checkpoints: int = 2
    gpus: int = 0

    @classmethod
    def from_request(cls, request: StageRequest) -> TrainArguments:
        training, deepspeed = request.training, request.training.get("deepspeed") or {}
        checkpoint = training.get("checkpoint") or {}
        return cls(
            model_name=request.model.get("name", "gpt2"), revision=request.model.get("revision", "main"),
            epochs=training.get("epochs", 4), learning_rate=training.get("learningRate", 1.372e-4),
            lr_scheduler=training.get("lrScheduler", "cosine"), batch_size=training.get("batchSize", 4),
            block_size=training.get("blockSize", 512), seed=training.get("seed", 42),
            precision=training.get("precision", "auto"), zero_stage=deepspeed.get("zeroStage", 2),
            offload=deepspeed.get("offload", "none"),
            validation_fraction=request.data.get("validationFraction", 0.1),
            checkpoint_every_minutes=checkpoint.get("everyMinutes", 10), keep_checkpoints=checkpoint.get("keep", 2),
            checkpoint_every_steps=checkpoint.get("everySteps", 0), gpus=request.gpus,
        )


# --- data ---------------------------------------------------------------------------------------------


def load_posts(storage: Storage, layout: S3Layout) -> list[str]:
    try:
        storage.read(f"s3://{layout.bucket}/{layout.key('data', 'manifest.json')}")
        body = storage.read(f"s3://{layout.bucket}/{layout.dataset}")
    except FileNotFoundError:
        raise MissingInput(f"no complete dataset at s3://{layout.bucket}/{layout.key('data')}/: run the scrape stage first") from None
    return [json.loads(line)["text"] for line in body.decode().splitlines() if line.strip()]


def split_posts(posts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    import random

    shuffled = list(posts)
    random.Random(seed).shuffle(shuffled)
    held_out = int(len(shuffled) * fraction) if len(shuffled) > 1 else 0
    return shuffled[held_out:], shuffled[:held_out]


def pack(token_ids: list[int], block_size: int) -> list[list[int]]:
    """Contiguous blocks of `block_size` tokens; the remainder shorter than a block is dropped."""
    return [token_ids[i:i + block_size] for i in range(0, len(token_ids) - block_size + 1, block_size)]


def tokenize_posts(tokenizer, posts: list[str]) -> list[int]:
    """huggingtweets' format: <|endoftext|> before, between and after posts, so the model learns to stop."""
    return tokenizer(EOS + EOS.join(posts) + EOS)["input_ids"] if posts else []


class BlockDataset:
    """labels = input_ids, every EOS included: a collator that pads with EOS would mask them all out."""

    def __init__(self, blocks: list[list[int]]):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index):
        import torch

        ids = torch.tensor(self.blocks[index], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


# --- model --------------------------------------------------------------------------------------------


def resolve_model(storage: Storage, name: str, cache: Path) -> str:
    """A Hub id or local path as it is; an s3:// prefix downloaded first. One from_pretrained path after."""
    if not name.startswith("s3://"):
        return name
    bucket, _, prefix = name[len("s3://"):].partition("/")
    target = cache / "base-model"
    count = storage.download_prefix(bucket, prefix.rstrip("/") + "/", target)
    if not count:
        raise BaseModelUnavailable(f"no model files under {name}")
    return str(target)


def load_model_and_tokenizer(source: str, revision: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as error:
        raise BaseModelUnavailable(f"cannot load the base model {source!r} (revision {revision}): {str(error).splitlines()[0]}") from None
    return model, tokenizer


def deepspeed_config(args: TrainArguments) -> dict:
    """ZeRO from the CRD, or the user's complete config from the mounted ConfigMap."""
    if Path(DEEPSPEED_CONFIG_PATH).is_file():
        return json.loads(Path(DEEPSPEED_CONFIG_PATH).read_text())
    zero: dict = {"stage": args.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if args.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if args.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if args.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # so save_model writes model.safetensors
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        # transformers' own AdamW: no DeepSpeed op to compile, the same optimizer on CPU and GPU.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }


TIMINGS_LOG_PREFIX = "stage timings json: "


def timings_from_log(text: str) -> dict | None:
    """The stage's timing record from its log (what `run_train` writes last), or None if it has none."""
    if TIMINGS_LOG_PREFIX not in text:
        return None
    return json.loads(text.split(TIMINGS_LOG_PREFIX, 1)[1].splitlines()[0])


def skip_shared_memory_comm(world_size: int, cuda: bool) -> None:
    """On CPU, DeepSpeed compiles its shared-memory all-reduce op with g++ when the process group starts (minutes,
    and the image has no compiler). A single process has no peer to share memory with: mark the op unavailable.
    Seeding DeepSpeed's table of compatible ops also skips its compiler probes; `.get` is its only reader."""
    if cuda or world_size > 1:
        return
    import deepspeed.ops

    vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False


def describe_deepspeed(config: dict) -> str:
    zero = config.get("zero_optimization", {})
    offload = " with CPU offload" if zero.get("offload_optimizer") else ""
    return f"ZeRO stage {zero.get('stage', 0)}{offload}"


def training_arguments(args: TrainArguments, output_dir: str, train_blocks: int, has_eval: bool, world_size: int,
                       cuda: bool) -> dict:
    """The keyword arguments of transformers' TrainingArguments for the stage."""
    return dict(
        output_dir=output_dir,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=0,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        seed=args.seed,
        eval_strategy="epoch" if has_eval else "no",
        logging_steps=max(1, math.ceil(train_blocks / args.batch_size / world_size / 10)),
        logging_nan_inf_filter=False,  # its isnan() check on every step's loss is a device sync per step on a GPU
        save_strategy="no",  # saves come from TimedCheckpoints, and one at the end
        report_to=[],
        deepspeed=deepspeed_config(args),
        use_cpu=not cuda,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **precision_flags(args.precision),
    )


def precision_flags(precision: str) -> dict:
    import torch

    if precision == "auto":
        if not torch.cuda.is_available():
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


# --- where the stage's wall time goes -------------------------------------------------------------------


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process started (interpreter start-up and imports before the stage ran), from /proc."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class PhaseTimes:
    """Wall seconds per phase of the stage. Phases do not overlap, so they add up to the stage's wall time;
    everything but `trainingSteps` (forward, backward, optimizer) is what a GPU pod pays for without training."""

    LOOP = "trainingSteps"

    def __init__(self, clock=time.monotonic, before_start: float | None = None):
        self.clock = clock
        self.started = clock()
        self.seconds: dict[str, float] = {}
        if before_start is not None:
            self.seconds["processStart"] = before_start
        self.background: list[dict] = []  # checkpoint uploads, overlapping the loop

    @contextmanager
    def phase(self, name: str):
        start = self.clock()
        try:
            yield
        finally:
            self.add(name, self.clock() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def record(self) -> dict:
        """The phases in seconds, the total and each phase's share of it, and the share outside the loop."""
        total = self.seconds.get("processStart", 0.0) + (self.clock() - self.started)
        phases = dict(self.seconds)
        phases["other"] = max(0.0, total - sum(phases.values()))
        return {
            "totalSeconds": round(total, 3),
            "seconds": {name: round(value, 3) for name, value in phases.items()},
            "share": {name: round(value / total, 4) if total > 0 else 0.0 for name, value in phases.items()},
            "outsideLoopShare": round(1 - phases.get(self.LOOP, 0.0) / total, 4) if total > 0 else 0.0,
            "checkpointUploads": self.background,
        }

    def summary(self) -> str:
        record = self.record()
        parts = ", ".join(f"{name} {value:.1f}s" for name, value in record["seconds"].items() if value >= 0.05)
        return f"{record['totalSeconds']:.1f}s, {100 * record['outsideLoopShare']:.0f}% outside the training steps: {parts}"


# --- checkpoints and progress in S3 ---------------------------------------------------------------------


def checkpoint_step(name: str) -> int:
    """The step of a checkpoint directory ("checkpoint-12") or of a key inside one (".../checkpoint-12/manifest.json")."""
    return int(next(part for part in reversed(name.split("/")) if part.startswith("checkpoint-")).split("-")[-1])


def uploaded_local_checkpoints(local_steps: Iterable[int], newest_uploaded: int | None) -> list[int]:
    """The local checkpoints whose copies can go: uploads run in step order, so S3 holds every step up to the
    newest uploaded one (or a newer checkpoint that replaces it), and a resume reads from S3."""
    return sorted(step for step in local_steps if newest_uploaded is not None and step <= newest_uploaded)


class CheckpointUploads:
    """Uploads the checkpoints saved under `directory`, one at a time and in step order, off the training thread.

    The training thread calls `check` at each step: a failed upload is raised there, not when training ends,
    and the local copies of uploaded checkpoints are deleted. Before a save it calls `make_room`, which waits
    while `keep` checkpoints are still uploading: the pod's disk holds at most `keep` checkpoints."""

    def __init__(self, directory: Path, upload: Callable[[Path, int], None], keep: int, uploaded: int | None = None):
        self.directory, self.upload, self.keep = directory, upload, max(1, keep)
        self.uploaded = uploaded  # the newest step S3 holds complete, a resumed one included
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self.pending: list[tuple[int, Future]] = []
        self.failed = False

    def submit(self, step: int) -> None:
        self.pending.append((step, self.pool.submit(self._upload, step)))

    def _upload(self, step: int) -> None:
        if self.failed:
            return  # the stage is failing: a newer upload would only delay its exit
        try:
            self.upload(self.directory / f"checkpoint-{step}", step)
        except BaseException:
            self.failed = True
            raise

    def check(self) -> None:
        self._settle(until_pending=None)

    def make_room(self) -> None:
        self._settle(until_pending=self.keep - 1)

    def wait(self) -> None:
        self._settle(until_pending=0)

    def _settle(self, until_pending: int | None) -> None:
        """Takes the finished uploads in step order, waiting for more while over `until_pending` are left."""
        while self.pending and (self.pending[0][1].done() or (until_pending is not None and len(self.pending) > until_pending)):
            step, future = self.pending.pop(0)
            error = future.exception()  # waits for it
            if error is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)
                told = str(error) if isinstance(error, (S3Failure, OSError)) else type(error).__name__
                raise CheckpointUploadFailed(f"saving checkpoint {step} to S3: {told}") from None
            self.uploaded = step
        for step in uploaded_local_checkpoints(self._local_steps(), self.uploaded):
            shutil.rmtree(self.directory / f"checkpoint-{step}", ignore_errors=True)

    def _local_steps(self) -> list[int]:
        return [checkpoint_step(path.name) for path in self.directory.glob("checkpoint-*") if path.is_dir()]


def newest_complete_checkpoint(storage: Storage, layout: S3Layout) -> tuple[int, dict] | None:
    manifests = storage.list_keys(layout.bucket, layout.checkpoints, suffix="/manifest.json")
    steps = sorted((checkpoint_step(key), key) for key in manifests)
    if not steps:
        return None
    step, key = steps[-1]
    return step, json.loads(storage.read(f"s3://{layout.bucket}/{key}"))


def make_callbacks(args: TrainArguments, storage: Storage, layout: S3Layout, tokens_per_step: int, times: PhaseTimes,
                   checkpoints: Path, resumed_step: int | None):
    from transformers import TrainerCallback

    class TimedCheckpoints(TrainerCallback):
        """Save at least every `checkpoint_every_minutes`, whatever the step count."""

        def __init__(self):
            self.last = time.monotonic()

        def on_step_end(self, training_args, state, control, **kwargs):
            every_steps = args.checkpoint_every_steps and state.global_step % args.checkpoint_every_steps == 0
            if every_steps or time.monotonic() - self.last >= args.checkpoint_every_minutes * 60:
                control.should_save = True
            return control

        def on_save(self, training_args, state, control, **kwargs):
            self.last = time.monotonic()

    class S3Checkpoints(TrainerCallback):
        """Upload each saved checkpoint in the background, manifest last; keep the newest K complete ones in S3
        and at most K on local disk. Listed after TimedCheckpoints, so on_step_end sees its decision to save."""

        def __init__(self):
            self.uploads = CheckpointUploads(checkpoints, self._upload, args.keep_checkpoints, uploaded=resumed_step)

        def on_step_end(self, training_args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.uploads.check()
                if control.should_save:
                    with times.phase("checkpointUploadWait"):
                        self.uploads.make_room()

        def on_save(self, training_args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.uploads.submit(state.global_step)

        def _upload(self, local: Path, step: int):
            started = time.monotonic()
            prefix = f"{layout.checkpoints}checkpoint-{step}/"
            manifest = storage.upload_directory(local, layout.bucket, prefix, manifest_key=prefix + "manifest.json")
            uploaded = time.monotonic() - started
            complete = storage.list_keys(layout.bucket, layout.checkpoints, suffix="/manifest.json")
            for old in sorted(complete, key=checkpoint_step)[:-args.keep_checkpoints]:
                storage.delete_prefix(layout.bucket, old.rsplit("/", 1)[0] + "/")
            size = sum(file["bytes"] for file in manifest["files"].values())
            times.background.append({"step": step, "bytes": size, "seconds": round(uploaded, 3)})
            log.info("checkpoint %d uploaded to s3://%s/%s (%.0f MB in %.1fs)", step, layout.bucket, prefix, size / 1e6, uploaded)

        def wait(self):
            with times.phase("checkpointUploadWait"):
                self.uploads.wait()

        def on_train_end(self, training_args, state, control, **kwargs):
            self.wait()

    class ProgressReports(TrainerCallback):
        """Steps, loss, tokens/s and ETA to S3 for the operator, written off the training thread."""

        def __init__(self):
            self.started = time.monotonic()
            self.first_step = None
            self.writer = ThreadPoolExecutor(max_workers=1)

        def on_log(self, training_args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not state.max_steps:
                return
            if self.first_step is None:
                self.first_step, self.started = state.global_step, time.monotonic()
                return
            elapsed = max(time.monotonic() - self.started, 1e-6)
            steps_done = state.global_step - self.first_step
            rate = steps_done / elapsed
            progress = Progress(
                step=state.global_step, total_steps=state.max_steps, loss=(logs or {}).get("loss"),
                tokens_per_second=round(rate * tokens_per_step, 1),
                eta_seconds=int((state.max_steps - state.global_step) / rate) if rate > 0 else None,
            )
            self.writer.submit(self._write, progress.to_json().encode())

        def _write(self, body: bytes):
            try:
                storage.put(layout.bucket, layout.progress, body)
            except Exception as error:  # progress is best effort: never stop training for it
                log.warning("progress report not written: %s", type(error).__name__)

    class EngineReady(TrainerCallback):
        """Marks the end of trainer.train()'s set-up (DeepSpeed engine, optimizer, resumed state)."""

        def __init__(self):
            self.at = None

        def on_train_begin(self, training_args, state, control, **kwargs):
            self.at = time.monotonic()

    return [TimedCheckpoints(), S3Checkpoints(), ProgressReports(), EngineReady()]


def timed_trainer(times: PhaseTimes):
    """transformers' Trainer, with its evaluations and checkpoint saves timed as phases of their own."""
    from transformers import Trainer

    class TimedTrainer(Trainer):
        def evaluate(self, *args, **kwargs):
            with times.phase("eval"):
                return super().evaluate(*args, **kwargs)

        def _save_checkpoint(self, *args, **kwargs):
            with times.phase("checkpointSave"):
                return super()._save_checkpoint(*args, **kwargs)

    return TimedTrainer


# --- the stage ----------------------------------------------------------------------------------------


def run_train(request: StageRequest, storage: Storage, workdir: Path | None = None) -> StageResult:
    times = PhaseTimes(before_start=seconds_since_process_start())
    with times.phase("imports"):
        import torch
        from transformers import GenerationConfig, TrainingArguments, set_seed

    args = TrainArguments.from_request(request)
    layout = request.s3
    workdir = Path(workdir or tempfile.mkdtemp(prefix="tweetbot-train-"))
    started = time.monotonic()
    set_seed(args.seed)

    with times.phase("dataLoad"):
        posts = load_posts(storage, layout)
    with times.phase("modelLoad"):
        model, tokenizer = load_model_and_tokenizer(resolve_model(storage, args.model_name, workdir), args.revision)
    with times.phase("dataLoad"):
        block_size = min(args.block_size, getattr(model.config, "n_positions", None) or args.block_size)
        train_posts, eval_posts = split_posts(posts, args.validation_fraction, args.seed)
        train_blocks = pack(tokenize_posts(tokenizer, train_posts), block_size)
        eval_blocks = pack(tokenize_posts(tokenizer, eval_posts), block_size)
    if not train_blocks:
        raise DatasetTooSmall(f"the dataset's {len(train_posts)} training posts make less than one block of {block_size} tokens: "
                              "collect more posts or lower spec.training.blockSize")
    log.info("%d train blocks, %d eval blocks of %d tokens", len(train_blocks), len(eval_blocks), block_size)

    output_dir = workdir / "checkpoints"
    resume_from = resumed_step = None
    with times.phase("resumeDownload"):
        newest = newest_complete_checkpoint(storage, layout)
        if newest is not None:
            resumed_step, manifest = newest
            resume_from = output_dir / f"checkpoint-{resumed_step}"
            storage.download_files(layout.bucket, manifest["files"], f"{layout.checkpoints}checkpoint-{resumed_step}/", resume_from)
            log.info("resuming from checkpoint %d", resumed_step)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_step = args.batch_size * block_size * world_size
    skip_shared_memory_comm(world_size, torch.cuda.is_available())
    with times.phase("trainerInit"):
        training_args = TrainingArguments(**training_arguments(args, str(output_dir), len(train_blocks), bool(eval_blocks),
                                                               world_size, cuda=torch.cuda.is_available()))
        callbacks = make_callbacks(args, storage, layout, tokens_per_step, times, output_dir, resumed_step)
        trainer = timed_trainer(times)(model=model, args=training_args, train_dataset=BlockDataset(train_blocks),
                                       eval_dataset=BlockDataset(eval_blocks) if eval_blocks else None, callbacks=callbacks)
    inside = dict(times.seconds)
    train_started = time.monotonic()
    try:
        train_result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemory(
            f"the GPU ran out of memory with batch size {args.batch_size} and block size {block_size}: use ZeRO stage 3, "
            "offload: cpu, or a smaller spec.training.batchSize / blockSize"
        ) from None
    # trainer.train() = engine set-up, then the loop: its steps, and the evaluations, saves and upload waits timed inside.
    in_train = sum(times.seconds.get(name, 0.0) - inside.get(name, 0.0) for name in times.seconds)
    engine_init = (callbacks[3].at or train_started) - train_started
    times.add("engineInit", engine_init)
    times.add(PhaseTimes.LOOP, time.monotonic() - train_started - engine_init - in_train)
    callbacks[1].wait()
    metrics = {"trainLoss": round(train_result.training_loss, 4), "steps": trainer.state.global_step}
    if eval_blocks:
        eval_loss = last_eval_loss(trainer.state.log_history, trainer.state.global_step)
        if eval_loss is None:  # a run resumed after its last epoch's evaluation
            eval_loss = trainer.evaluate()["eval_loss"]
        metrics.update(evalLoss=round(eval_loss, 4), perplexity=round(math.exp(min(eval_loss, 50)), 2))

    final_dir = workdir / "final"
    with times.phase("finalSave"):
        trainer.save_model(str(final_dir))
    if trainer.is_world_process_zero():
        if not (final_dir / "model.safetensors").is_file():
            raise StageError("training finished but model.safetensors was not written")
        with times.phase("finalSave"):
            tokenizer.save_pretrained(final_dir)
            GenerationConfig(prefix=EOS, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.eos_token_id, **GENERATION_DEFAULTS).save_pretrained(final_dir)
        with times.phase("samples"):
            (final_dir / "samples.json").write_text(json.dumps(sample_generations(final_dir, args.seed), ensure_ascii=False))
        # What the publish stage's model card says about training; the timings stop before the final upload.
        (final_dir / "training.json").write_text(json.dumps({
            "baseModel": args.model_name, "metrics": metrics,
            "hyperparameters": {"epochs": args.epochs, "learning rate": args.learning_rate, "scheduler": args.lr_scheduler,
                                "batch size per device": args.batch_size, "block size": block_size, "seed": args.seed,
                                "devices": world_size},
            "deepspeed": describe_deepspeed(training_args.deepspeed),
            "timings": times.record(),
        }, indent=1))
        with times.phase("finalUpload"):
            storage.upload_directory(final_dir, layout.bucket, layout.final_model, manifest_key=layout.final_model + "manifest.json")
    duration = time.monotonic() - started
    metrics.update(tokens=len(train_blocks) * block_size * args.epochs, durationSeconds=round(duration, 1),
                   gpuSeconds=round(duration * args.gpus, 1))
    log.info("stage timings: %s", times.summary())
    log.info("%s%s", TIMINGS_LOG_PREFIX, json.dumps(times.record()))
    shutil.rmtree(workdir, ignore_errors=True)
    return StageResult(stage="train", run_id=request.run_id, metrics=metrics,
                       artifacts={"modelUri": layout.uri("final") + "/"})


def last_eval_loss(log_history: list[dict], step: int) -> float | None:
    """The evaluation loss logged at `step` (the end-of-epoch evaluation of the final model), if there is one."""
    for entry in reversed(log_history):
        if "eval_loss" in entry and entry.get("step") == step:
            return entry["eval_loss"]
    return None


def sample_generations(model_dir: Path, seed: int, count: int = 3) -> list[str]:
    """A few texts from "My dream is" with the saved generation settings, for the model card."""
    from transformers import pipeline, set_seed
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # else, after ZeRO-3, from_pretrained would load the weights partitioned
    set_seed(seed)
    generator = pipeline("text-generation", model=str(model_dir), device="cpu")
    outputs = generator(SAMPLE_PROMPT, num_return_sequences=count, max_new_tokens=40)
    return [output["generated_text"] for output in outputs]
