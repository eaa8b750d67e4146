"""The train stage: the scrape stage's dataset -> a fine-tuned causal LM in S3, with transformers + DeepSpeed.

Read top to bottom like transformers' run_clm.py: arguments, data, model, training, saving, then `run_train`.
Checkpoints go to S3 in the background, and a restarted pod resumes from the newest complete one
(`checkpoints.py`); with spec.output.hub.checkpoints they go on to a branch of the bot's Hub repository (`hub.py`).
LoRA is `lora.py`, the experiment trackers `tracking.py`. Where the stage's wall time goes is recorded phase by
phase (`timing.py`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .checkpoints import S3CheckpointStore
from .contract import DEEPSPEED_CONFIG_PATH, SPEC_DEFAULTS, S3Layout, StageRequest, StageResult, section_defaults
from .errors import BaseModelUnavailable, DatasetTooSmall, MissingInput, NoUsableGPU, OutOfMemory, StageError
from .hub import HubCheckpoints
from .storage import Storage
from .timing import TIMINGS_LOG_PREFIX, PhaseTimes, seconds_since_process_start
from .tracking import Trackers, Tracking, tracker_environment, upload_tensorboard

log = logging.getLogger("tweetbot.train")
SAMPLE_PROMPT = "My dream is"
# huggingtweets' generation settings, saved with the model so pipeline() uses them.
GENERATION_DEFAULTS = {"do_sample": True, "top_p": 0.95, "temperature": 1.0, "min_length": 10, "max_length": 160}

# --- arguments ----------------------------------------------------------------------------------------

MODEL, DATA, TRAINING = (section_defaults(section, None) for section in ("model", "data", "training"))
LORA_DEFAULTS = SPEC_DEFAULTS.fields["training"].fields["lora"]
LORA = LORA_DEFAULTS.fields
# Settings the CRD gives no `default:`: a DeepSpeed config from a ConfigMap must leave zeroStage and offload
# unset, and everySteps is off (0) unless set.
ZERO_STAGE, OFFLOAD, EVERY_STEPS = 2, "none", 0


def arg(default, help: str):
    """A field of TrainArguments with its help text, as transformers' example scripts write them."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainArguments:
    """The stage's settings, from the TweetBot's spec (its defaults: `contract.SPEC_DEFAULTS`)."""

    model_name: str = arg(MODEL["name"], "Base model: a Hub id, a local path or an s3:// prefix.")
    revision: str = arg(MODEL["revision"], "The base model's revision on the Hub.")
    epochs: int = arg(TRAINING["epochs"], "Passes over the training posts.")
    learning_rate: float = arg(TRAINING["learningRate"], "AdamW's peak learning rate.")
    lr_scheduler: str = arg(TRAINING["lrScheduler"], "transformers' lr_scheduler_type.")
    batch_size: int = arg(TRAINING["batchSize"], "Sequences per device per step.")
    block_size: int = arg(TRAINING["blockSize"], "Tokens per sequence (at most the model's).")
    seed: int = arg(TRAINING["seed"], "Seed of the split, the shuffling and the samples.")
    precision: str = arg(TRAINING["precision"], "auto, bf16, fp16 or fp32 (auto: see precision_flags).")
    zero_stage: int = arg(ZERO_STAGE, "DeepSpeed ZeRO stage.")
    offload: str = arg(OFFLOAD, "none, or cpu: optimizer state (and stage 3's parameters) in CPU memory.")
    zero_asked: bool = arg(False, "The spec names zeroStage or offload: DeepSpeed runs even for one process.")
    validation_fraction: float = arg(DATA["validationFraction"], "Share of posts held out to evaluate.")
    checkpoint_every_minutes: float = arg(TRAINING["checkpoint"]["everyMinutes"], "Save a checkpoint to S3 at least this often.")
    checkpoint_every_steps: int = arg(EVERY_STEPS, "Also save every this many steps; 0: by time only.")
    keep_checkpoints: int = arg(TRAINING["checkpoint"]["keep"], "Complete checkpoints kept in S3.")
    gpus: int = arg(0, "GPUs of the pod, for the result's gpuSeconds.")
    method: str = arg(TRAINING["method"], "full: train every weight; lora: train low-rank adapters (peft) beside frozen weights.")
    lora_r: int = arg(LORA["r"], "LoRA's rank.")
    lora_alpha: int = arg(LORA["alpha"], "LoRA's scaling numerator (the update is scaled by alpha / r).")
    lora_dropout: float = arg(LORA["dropout"], "Dropout on the adapters' input.")
    lora_target_modules: tuple[str, ...] | None = arg(None, "Modules that get adapters; None: peft's default for the architecture.")
    lora_publish: str = arg(LORA["publish"], "merged: the base with the adapters merged in; adapter: the adapter files alone.")
    report_to: tuple[str, ...] = arg((), "Trackers of the run: tensorboard, wandb, mlflow (tracking.py).")
    run_name: str = arg("", "The run's name in the trackers: <namespace>/<bot>/<run>.")

    @classmethod
    def from_request(cls, request: StageRequest) -> TrainArguments:
        model, data = section_defaults("model", request.model), section_defaults("data", request.data)
        training = section_defaults("training", request.training)
        deepspeed, checkpoint = training["deepspeed"], training["checkpoint"]
        tracking = Tracking.from_request(request)
        lora = LORA_DEFAULTS.apply(training.get("lora") or {})  # read only with method lora; its defaults then
        return cls(
            model_name=model["name"], revision=model["revision"], epochs=training["epochs"],
            learning_rate=training["learningRate"], lr_scheduler=training["lrScheduler"], batch_size=training["batchSize"],
            block_size=training["blockSize"], seed=training["seed"], precision=training["precision"],
            zero_stage=deepspeed.get("zeroStage", ZERO_STAGE), offload=deepspeed.get("offload", OFFLOAD),
            zero_asked=bool({"zeroStage", "offload"} & set(deepspeed)),
            validation_fraction=data["validationFraction"], checkpoint_every_minutes=checkpoint["everyMinutes"],
            checkpoint_every_steps=checkpoint.get("everySteps", EVERY_STEPS), keep_checkpoints=checkpoint["keep"], gpus=request.gpus,
            report_to=tracking.report_to, run_name=tracking.run_name,
            method=training["method"], lora_r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            lora_target_modules=tuple(lora["targetModules"]) if lora.get("targetModules") else None,
            lora_publish=lora["publish"],
        )

    @property
    def lora(self) -> bool:
        return self.method == "lora"

    @property
    def publishes_adapter(self) -> bool:
        return self.lora and self.lora_publish == "adapter"


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
    """huggingtweets' format: the tokenizer's own end-of-text token (GPT-2's <|endoftext|>, Llama 3's
    <|end_of_text|>, ...) before, between and after posts, so the model learns to stop. Each post is tokenized
    without special tokens and the EOS id put between them: a BOS the tokenizer would add to every text stays out."""
    if not posts:
        return []
    ids = [tokenizer.eos_token_id]
    for post in tokenizer(posts, add_special_tokens=False)["input_ids"]:
        ids += post + [tokenizer.eos_token_id]
    return ids


@dataclass
class Blocks:
    """The posts as training and evaluation blocks of `size` tokens."""

    train: list[list[int]]
    eval: list[list[int]]
    size: int


# The names configs give their context length: most (Llama, Qwen2, Mistral, GPT-2 through its attribute_map)
# answer to the first; the others are what some configs call it instead.
CONTEXT_LENGTH_NAMES = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(config) -> int | None:
    """The longest sequence the model takes, None if its config does not say."""
    config = config.get_text_config()  # a multimodal model's language half
    for name in CONTEXT_LENGTH_NAMES:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def make_blocks(posts: list[str], tokenizer, model, args: TrainArguments) -> Blocks:
    """Split, tokenize and pack the posts; blocks no longer than the model's context."""
    size = min(args.block_size, context_length(model.config) or args.block_size)
    train_posts, eval_posts = split_posts(posts, args.validation_fraction, args.seed)
    blocks = Blocks(pack(tokenize_posts(tokenizer, train_posts), size), pack(tokenize_posts(tokenizer, eval_posts), size), size)
    if not blocks.train:
        raise DatasetTooSmall(f"the dataset's {len(train_posts)} training posts make less than one block of {size} tokens: "
                              "collect more posts or lower spec.training.blockSize")
    log.info("%d train blocks, %d eval blocks of %d tokens", len(blocks.train), len(blocks.eval), size)
    return blocks


class BlockDataset:
    """labels = input_ids, every EOS included: a collator that pads with EOS (the pad of tokenizers without one)
    would mask them all out."""

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


def model_to_load(storage: Storage, request: StageRequest, args: TrainArguments) -> str:
    """What `resolve_model` loads: spec.model's name, or for a scheduled run that goes on from an earlier one
    (`starts_from_run`), that run's final model in S3. baseModel (training.json, the card) stays spec.model's."""
    if not request.starts_from_run:
        return args.model_name
    earlier = request.s3.of_run(request.starts_from_run)
    uri = f"s3://{earlier.bucket}/{earlier.final_model}"
    try:
        storage.read(uri + "manifest.json")  # written last: without it the model is not complete
    except (FileNotFoundError, PermissionError):
        raise MissingInput(f"no complete final model of the run {request.starts_from_run} at {uri}: "
                           "its train stage did not finish, or the run was deleted") from None
    log.info("starting from the final model of the run %s", request.starts_from_run)
    return uri


def load_model_and_tokenizer(source: str, revision: str):
    """Any causal LM whose architecture transformers itself implements: code shipped in a model's repository is
    never run (trust_remote_code=False). From the Hub, huggingface_hub sends the token in HF_TOKEN, which the
    operator sets from the spec's Hub token, so gated and private base models load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)
        if tokenizer.eos_token is None:
            raise BaseModelUnavailable(f"the base model {source!r} (revision {revision}) has no end-of-text token: its "
                                       "tokenizer sets no eos_token, which separates the posts and ends generated text")
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise BaseModelUnavailable(f"cannot load the base model {source!r} (revision {revision}): {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:  # as run_clm does: batched generation pads; the training blocks need no padding
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --- training -----------------------------------------------------------------------------------------


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


def uses_deepspeed(args: TrainArguments, world_size: int) -> bool:
    """DeepSpeed across ranks, or when the spec asks for it (zeroStage, offload, a config). One process (one GPU
    or the CPU) with the defaults trains with the plain Trainer: ZeRO has nothing to partition with one rank and
    the optimizer is transformers' AdamW either way, so DeepSpeed's bf16 master weights cost what autocast's
    fp32 weights do. Measured on CPU it ran at 0.86x the tokens/s with 38 MB more (`tweetbot_dev.gpu_smoke
    --settings zero2,plain`, tiny GPT-2, medians of 3 runs), and its import, process group and engine set-up
    are a pod's fixed cost (`tweetbot bench`, train fixed cost against the floor)."""
    return world_size > 1 or args.zero_asked or Path(DEEPSPEED_CONFIG_PATH).is_file()


def single_process_group() -> None:
    """DeepSpeed wants a process group even for one process; torch.distributed.run sets these for several."""
    if "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def describe_deepspeed(config: dict | None) -> str:
    if config is None:
        return "none (one process)"
    zero = config.get("zero_optimization", {})
    offload = " with CPU offload" if zero.get("offload_optimizer") else ""
    return f"ZeRO stage {zero.get('stage', 0)}{offload}"


def skip_shared_memory_comm(cuda: bool) -> None:
    """On CPU, DeepSpeed compiles its shared-memory all-reduce op with g++ when the process group starts (minutes,
    and the image has no compiler). Only its inference_all_reduce uses the op, so with any number of ranks, training's
    collectives go through the process group (gloo) with or without it: mark the op unavailable. Seeding
    DeepSpeed's table of compatible ops also skips its compiler probes; `.get` is its only reader."""
    if cuda:
        return
    import deepspeed.ops

    vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False


def skip_deepspeed_import() -> None:
    """Without DeepSpeed, accelerate still imports it whenever it is installed, to ask whether the model is wrapped
    in DeepSpeed's engine, which it then cannot be: 1.4 s of a pod's start here (MLflow's import among it, which
    DeepSpeed imports when installed). Its only reader is that question."""
    import accelerate.utils.other

    accelerate.utils.other.is_deepspeed_available = lambda: False


def require_gpus(gpus: int) -> None:
    """A pod granted GPUs it cannot use would train on its CPUs for hours while holding them: fail before anything
    heavy loads. The ranks of a pod each see all of its GPUs."""
    if not gpus:
        return
    import torch

    usable = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if usable < gpus:
        raise NoUsableGPU(
            f"spec.resources.gpus is {gpus} but CUDA sees {usable} GPU(s) in the pod: check the node's NVIDIA driver "
            "(nvidia-smi on the node), that the NVIDIA device plugin runs there, and that the pod requests nvidia.com/gpu"
        )


def precision_flags(precision: str) -> dict:
    """`auto`: bf16 where the GPU computes in it (compute capability 8.0, Ampere, and newer), fp16 on older
    GPUs, fp32 on CPU. torch's `is_bf16_supported()` also counts bf16 emulated in fp32 (T4, V100), which is
    slower than fp16 there."""
    import torch

    if precision == "auto":
        if not torch.cuda.is_available():
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


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
        save_strategy="no",  # saves come from hooks.TimedCheckpoints, and one at the end
        report_to=list(args.report_to),  # transformers' callbacks, on rank 0; tracking.py sets them up
        run_name=args.run_name or None,
        deepspeed=deepspeed_config(args) if uses_deepspeed(args, world_size) else None,
        use_cpu=not cuda,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **precision_flags(args.precision),
    )


# The settings of `training_arguments` that depend on the blocks. The blocks need the model (its context length)
# and the model loads after TrainingArguments exists: run_train sets these on it once the blocks exist.
BLOCK_SETTINGS = ("eval_strategy", "logging_steps")


def work_directory(run_id: str) -> Path:
    """One per launch, shared by the ranks of a pod: each rank's checkpoint shards meet there for rank 0 to upload,
    and a resumed checkpoint is downloaded there once for all. torchrun's run id (a fresh uuid with --standalone)
    names it, so no launch meets another's files; a process alone gets a fresh directory."""
    launch = os.environ.get("TORCHELASTIC_RUN_ID")
    if not launch:
        return Path(tempfile.mkdtemp(prefix="tweetbot-train-"))
    directory = Path(tempfile.gettempdir()) / f"tweetbot-train-{run_id}-{launch}"
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory


def on_rank_zero(training_args, workdir: Path, name: str, download: Callable[[], str | int | None]):
    """`download()` on the pod's first rank alone, into the directory the pod's ranks share, and its result on
    every rank: ranks that downloaded side by side would overwrite the files the others read. The result passes
    through that directory, which needs nothing of the process group's backend but a barrier."""
    result = workdir / f"{name}.json"
    if training_args.local_process_index == 0:
        result.write_text(json.dumps(download()))
    training_args.distributed_state.wait_for_everyone()
    return json.loads(result.read_text())


def download_newest_checkpoint(store: S3CheckpointStore, output_dir: Path) -> int | None:
    shutil.rmtree(output_dir, ignore_errors=True)  # a directory of an earlier launch that had the same run id
    return store.download_newest(output_dir)


def train_model(trainer, resume_from: Path | None, args: TrainArguments, block_size: int):
    """trainer.train(), from `resume_from` if given; a GPU out of memory is told with what to change."""
    import torch

    try:
        return trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemory(
            f"the GPU ran out of memory with batch size {args.batch_size} and block size {block_size}: use ZeRO stage 3, "
            "offload: cpu, or a smaller spec.training.batchSize / blockSize"
        ) from None


def last_eval_loss(log_history: list[dict], step: int) -> float | None:
    """The evaluation loss logged at `step` (the end-of-epoch evaluation of the final model), if there is one."""
    for entry in reversed(log_history):
        if "eval_loss" in entry and entry.get("step") == step:
            return entry["eval_loss"]
    return None


def training_metrics(trainer, train_result, has_eval: bool) -> dict:
    metrics = {"trainLoss": round(train_result.training_loss, 4), "steps": trainer.state.global_step}
    if has_eval:
        eval_loss = last_eval_loss(trainer.state.log_history, trainer.state.global_step)
        if eval_loss is None:  # a run resumed after its last epoch's evaluation
            eval_loss = trainer.evaluate()["eval_loss"]
        metrics.update(evalLoss=round(eval_loss, 4), perplexity=round(math.exp(min(eval_loss, 50)), 2))
    return metrics


# --- saving -------------------------------------------------------------------------------------------


def save_for_generation(final_dir: Path, tokenizer) -> None:
    """The tokenizer and huggingtweets' generation settings next to the weights, so pipeline() needs nothing else."""
    from transformers import GenerationConfig

    if not any((final_dir / name).is_file() for name in ("model.safetensors", "adapter_model.safetensors")):
        raise StageError("training finished but neither model.safetensors nor adapter_model.safetensors was written")
    tokenizer.save_pretrained(final_dir)
    # Every post was trained as following an EOS: a text generated from nothing starts after one too.
    GenerationConfig(prefix=tokenizer.eos_token, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, **GENERATION_DEFAULTS).save_pretrained(final_dir)


def sample_generations(model_dir: Path, seed: int, count: int = 3, base: tuple[str, str] | None = None,
                       trained=None) -> list[str]:
    """A few texts from "My dream is" with the saved generation settings, for the model card. `trained`: the model
    as it was saved to `model_dir`, still in memory and whole on this rank: sampled where it is (its GPU), with no
    second load. Else the saved files on the CPU; `base`: (source, revision) of the base model under an adapter in
    `model_dir`, loaded from there: the adapter names the base as its users find it (`lora.name_the_base`), which
    may not be where this pod can load it."""
    from transformers import GenerationConfig, pipeline, set_seed
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # else, after ZeRO-3, from_pretrained would load the weights partitioned
    set_seed(seed)
    model, device = str(model_dir), "cpu"
    if trained is not None:
        model, device = trained.eval(), None  # eval: no dropout; None: where the model is
    elif base is not None:
        from .lora import base_with_adapter

        model = base_with_adapter(model_dir, *base)
    if not isinstance(model, str):
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    generator = pipeline("text-generation", model=model, tokenizer=str(model_dir), device=device, trust_remote_code=False)
    outputs = generator(SAMPLE_PROMPT, num_return_sequences=count, max_new_tokens=40)
    return [output["generated_text"] for output in outputs]


def training_facts(args: TrainArguments, metrics: dict, block_size: int, world_size: int, deepspeed: dict,
                   times: PhaseTimes, lora_targets: list[str] | None = None, tracking: dict[str, str] | None = None) -> dict:
    """final/training.json: what the publish stage's model card says about training (the trackers' run pages among
    it), and the timings so far. `lora_targets`: the modules that got adapters, as peft resolved them."""
    from .lora import describe

    facts = {
        "baseModel": args.model_name, "metrics": metrics, "method": args.method,
        "hyperparameters": {"epochs": args.epochs, "learning rate": args.learning_rate, "scheduler": args.lr_scheduler,
                            "batch size per device": args.batch_size, "block size": block_size, "seed": args.seed,
                            "devices": world_size},
        "deepspeed": describe_deepspeed(deepspeed),
        **({"tracking": tracking} if tracking else {}),
        "timings": times.record(),
    }
    if args.lora:
        facts["hyperparameters"]["LoRA"] = describe(args.lora_r, args.lora_alpha, args.lora_dropout, lora_targets)
        facts["lora"] = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                         "targetModules": lora_targets, "publish": args.lora_publish}
    return facts


# --- the stage ----------------------------------------------------------------------------------------


def run_train(request: StageRequest, storage: Storage, workdir: Path | None = None) -> StageResult:
    times = PhaseTimes(before_start=seconds_since_process_start())
    with times.phase("imports"):
        import torch
        from transformers import TrainingArguments, set_seed

    args, layout = TrainArguments.from_request(request), request.s3
    require_gpus(args.gpus)
    workdir = Path(workdir) if workdir else work_directory(request.run_id)
    tracking = Tracking.from_request(request)
    os.environ.update(tracker_environment(tracking, workdir, dict(os.environ)))  # before the Trainer's callbacks read it
    started = time.monotonic()
    set_seed(args.seed)

    world_size, cuda = int(os.environ.get("WORLD_SIZE", "1")), torch.cuda.is_available()
    if uses_deepspeed(args, world_size):
        single_process_group()
        skip_shared_memory_comm(cuda)
    else:
        skip_deepspeed_import()
    output_dir = workdir / "checkpoints"
    with times.phase("trainerInit"):
        # Before from_pretrained, which reads the DeepSpeed config this registers: under ZeRO-3 each rank then
        # loads only its partition of the weights instead of the whole model.
        training_args = TrainingArguments(**training_arguments(args, str(output_dir), 0, False, world_size, cuda=cuda))
        # Before anything heavy loads: a tracker that cannot be reached fails the stage now, not after training.
        trackers = Trackers(tracking, workdir)
        if training_args.process_index == 0:
            trackers.start()

    with times.phase("dataLoad"):
        posts = load_posts(storage, layout)
    with times.phase("modelLoad"):
        wanted = model_to_load(storage, request, args)  # on every rank: one failing alone would leave the others waiting
        source = on_rank_zero(training_args, workdir, "base-model", lambda: resolve_model(storage, wanted, workdir))
        model, tokenizer = load_model_and_tokenizer(source, args.revision)
    lora_targets = None
    if args.lora:
        from .lora import adapted_modules, with_adapters

        model = with_adapters(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
        lora_targets = adapted_modules(model)
    with times.phase("dataLoad"):
        blocks = make_blocks(posts, tokenizer, model, args)
    settings = training_arguments(args, str(output_dir), len(blocks.train), bool(blocks.eval), world_size, cuda=cuda)
    for name in BLOCK_SETTINGS:
        setattr(training_args, name, settings[name])

    # torch.distributed.run numbers the pods of a multi-node training (GROUP_RANK); the first holds global rank 0.
    node, nodes = int(os.environ.get("GROUP_RANK", "0")), int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    store = S3CheckpointStore(storage, layout, args.keep_checkpoints, node=node, nodes=nodes)
    with times.phase("resumeDownload"):
        resumed_step = on_rank_zero(training_args, workdir, "resumed", lambda: download_newest_checkpoint(store, output_dir))
    store.resumed = resumed_step
    resume_from = output_dir / f"checkpoint-{resumed_step}" if resumed_step is not None else None

    with times.phase("trainerInit"):
        from .hooks import ProgressReports, S3Checkpoints, TimedCheckpoints, TimedTrainer, TrainTimes
        saves = TimedCheckpoints(args.checkpoint_every_minutes, args.checkpoint_every_steps)
        # After `saves`: it acts on their decision. Each checkpoint, once in S3, goes to the Hub's branch, and
        # TensorBoard's events follow it to S3.
        hub = HubCheckpoints.wanted(request, os.environ) if node == 0 else None
        after_upload = [hub.push] if hub else []
        if "tensorboard" in tracking.report_to and node == 0:
            after_upload.append(lambda local, step: upload_tensorboard(storage, layout, trackers.tensorboard_dir))
        uploads = S3Checkpoints(store, output_dir, times, uploaded=resumed_step, then=after_upload)
        progress = ProgressReports(storage, layout, tokens_per_step=args.batch_size * blocks.size * world_size)
        train_times = TrainTimes(times)
        trainer = TimedTrainer(model=model, args=training_args, train_dataset=BlockDataset(blocks.train),
                               eval_dataset=BlockDataset(blocks.eval) if blocks.eval else None,
                               callbacks=[saves, uploads, progress, train_times], times=times)
    with times.training(engine_ready=lambda: train_times.engine_ready):
        train_result = train_model(trainer, resume_from, args, blocks.size)
    uploads.wait()
    metrics = training_metrics(trainer, train_result, bool(blocks.eval))

    final_dir = workdir / "final"
    with times.phase("finalSave"):
        trainer.save_model(str(final_dir))
    if not trainer.is_world_process_zero():
        return StageResult(stage="train", run_id=request.run_id, metrics=metrics)  # rank 0's result is the stage's
    with times.phase("finalSave"):
        if args.lora:
            from .lora import merge_into_final, name_the_base

            (final_dir / "README.md").unlink(missing_ok=True)  # peft's card; the publish stage writes the bot's
            if args.publishes_adapter:
                name_the_base(final_dir, args.model_name, args.revision)
            else:
                merge_into_final(final_dir, source, args.revision)
        save_for_generation(final_dir, tokenizer)
    with times.phase("samples"):
        base = (source, args.revision) if args.publishes_adapter else None
        # The weights in memory are those saved unless adapters were merged or published apart, or ZeRO-3 holds a
        # partition of them on each rank.
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        trained = trainer.model if not args.lora and not is_deepspeed_zero3_enabled() else None
        samples = sample_generations(final_dir, args.seed, base=base, trained=trained)
        (final_dir / "samples.json").write_text(json.dumps(samples, ensure_ascii=False))
    with times.phase("trackers"):
        trackers.log_samples(SAMPLE_PROMPT, samples, trainer.state.global_step)
        run_pages = trackers.finish()
        if "tensorboard" in tracking.report_to:
            upload_tensorboard(storage, layout, trackers.tensorboard_dir)
    facts = training_facts(args, metrics, blocks.size, world_size, training_args.deepspeed, times, lora_targets,
                           tracking=run_pages)
    (final_dir / "training.json").write_text(json.dumps(facts, indent=1))
    with times.phase("finalUpload"):
        storage.upload_directory(final_dir, layout.bucket, layout.final_model, manifest_key=layout.final_model + "manifest.json")
    duration = time.monotonic() - started
    metrics.update(tokens=len(blocks.train) * blocks.size * args.epochs, durationSeconds=round(duration, 1),
                   gpuSeconds=round(duration * args.gpus, 1))
    log.info("stage timings: %s", times.summary())
    log.info("%s%s", TIMINGS_LOG_PREFIX, json.dumps(times.record()))
    shutil.rmtree(workdir, ignore_errors=True)  # the other ranks are done with it: they wrote nothing after save_model
    artifacts = {"modelUri": layout.uri("final") + "/"}
    if hub is not None and hub.revision:
        artifacts["hubCheckpointRevision"] = hub.revision  # the newest checkpoint's "<branch>@<commit>"
    return StageResult(stage="train", run_id=request.run_id, metrics=metrics, artifacts=artifacts)
