"""Benchmarks of the trainer image (`tweetbot bench`), each against a baseline measured in the same run:

- bench_train: the real train stage (`tweetbot-trainer train`, the operator's Job environment, a local MinIO)
  against huggingtweets' way of training (batch 1, contiguous blocks of the model's maximum length, a plain
  transformers Trainer, fp32) on the same training posts, the same tiny GPT-2, on CPU; and where the stage's
  wall time goes (start-up, model load, DeepSpeed init, the training steps, evaluation, saves, uploads).
- the floor of the train stage (`_floor_train`): a process that imports only what training needs, loads the
  same model from local disk and runs the same optimizer steps on the stage's own token blocks in a plain
  loop. The stage's wall time and its fixed cost (wall time less the training steps) stand against the floor's.
- bench_s3_upload: the stage's checkpoint upload path (Storage.upload_directory) against one plain
  single-stream boto3 put_object per file, on a GPT-2-sized checkpoint.

Every function returns a JSON-able dict of raw numbers and ratios.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

WORDS = "my dream is to build a small robot that writes posts about cats and coffee every morning".split()
# The tiny GPT-2 of the benchmark: small enough for a CPU, shaped like GPT-2 (tied LM head, 4 heads of 32).
TINY = {"vocab_size": 2000, "n_positions": 256, "n_embd": 128, "n_layer": 4, "n_head": 4}


def generated_posts(count: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(6 + i % 20)) for i in range(count)]


@contextmanager
def local_s3(work: Path):
    """A throw-away MinIO on loopback (the binaries `tweetbot dev build` made) and a boto3 client for it."""
    import boto3

    from .binaries import ensure_binaries
    from .s3 import S3Server

    server = S3Server(work / "s3-data", ensure_binaries(log=lambda *_: None))
    server.start(work / "minio.log")
    try:
        client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
                              aws_secret_access_key=server.secret_key, region_name="us-east-1")
        yield server, client
    finally:
        server.stop()


# --- the train stage against huggingtweets' way of training -----------------------------------------------


def _baseline_train(model_dir: str, posts_file: str, epochs: int, seed: int) -> dict:
    """huggingtweets' way, in this process: batch 1, contiguous blocks of the model's maximum length (what its
    TextDataset made from the same <|endoftext|>-joined text), transformers' plain Trainer with its defaults
    (linear schedule, fp32), no evaluation and no checkpoints. No DeepSpeed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from tweetbot_trainer.train import BlockDataset, pack, tokenize_posts

    process_started = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    block = model.config.n_positions
    blocks = pack(tokenize_posts(tokenizer, json.loads(Path(posts_file).read_text())), block)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="tweetbot-bench-baseline-"), num_train_epochs=epochs,
        per_device_train_batch_size=1, learning_rate=1.372e-4, lr_scheduler_type="linear", seed=seed,
        save_strategy="no", report_to=[], logging_strategy="no", disable_tqdm=True, use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=BlockDataset(blocks))
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    shutil.rmtree(args.output_dir, ignore_errors=True)
    return {"tokens": len(blocks) * block * epochs, "blocks": len(blocks), "block_size": block, "seconds": seconds,
            "setup_seconds": started - process_started, "train_loss": result.training_loss,
            "steps": trainer.state.global_step}


def _floor_train(model_dir: str, blocks_file: str, epochs: int, batch_size: int, learning_rate: float, seed: int) -> dict:
    """The least a train pod could do: import torch and the model's class, load the model from local disk and
    run the stage's optimizer steps (AdamW, gradient clipping at 1.0, cosine schedule without warm-up: the
    stage's defaults) over the stage's own training blocks in a plain loop. Nothing else: no data read or
    tokenized, no evaluation, no checkpoint, no upload."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    blocks = torch.tensor(json.loads(Path(blocks_file).read_text()), dtype=torch.long)
    steps = math.ceil(len(blocks) / batch_size) * epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    started = time.perf_counter()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(blocks))
        for first in range(0, len(blocks), batch_size):
            batch = blocks[order[first:first + batch_size]]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
    seconds = time.perf_counter() - started
    return {"steps": steps, "steps_seconds": seconds, "train_loss": float(torch.stack(losses).mean())}


def _in_process(function: str, env: dict, *args) -> dict:
    """One of this module's functions in a fresh process (its imports and start-up counted), its result and the
    process's wall time."""
    code = (f"import json; from tweetbot_dev.bench_trainer import {function}; "
            f"print('RESULT' + json.dumps({function}(*{args!r})))")
    started = time.perf_counter()
    output = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                            timeout=900).stdout
    result = json.loads(output.split("RESULT", 1)[1].splitlines()[0])
    result["wall_seconds"] = time.perf_counter() - started
    return result


def stage_blocks(model_dir: Path, texts: list[str], args):
    """The training and evaluation blocks the stage makes of `texts` with its settings `args`."""
    from transformers import AutoConfig, AutoTokenizer

    from tweetbot_trainer.train import make_blocks

    class Model:
        config = AutoConfig.from_pretrained(model_dir)

    return make_blocks(texts, AutoTokenizer.from_pretrained(model_dir), Model, args)


def _stage_env(request, s3_server, work: Path, threads: int) -> dict:
    """What the operator's train Job sets for a CPU-only bot (gpus: 0, cpu: `threads`): the request, the S3
    credentials from the bot's Secret, OMP_NUM_THREADS and DS_ACCELERATOR=cpu."""
    return {**os.environ, "TWEETBOT_REQUEST": request.to_json(), "OMP_NUM_THREADS": str(threads),
            "DS_ACCELERATOR": "cpu", "AWS_ACCESS_KEY_ID": s3_server.access_key,
            "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
            "TWEETBOT_TERMINATION_MESSAGE_PATH": str(work / "termination-log")}


def _run_stage(request, s3_server, work: Path, threads: int) -> dict:
    """`tweetbot-trainer train` as the Job runs it, in a fresh process; its timings back from its log."""
    from tweetbot_trainer.contract import StageResult
    from tweetbot_trainer.timing import timings_from_log

    log_path = work / f"train-{request.run_id}.log"
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        code = subprocess.run([sys.executable, "-m", "tweetbot_trainer.cli", "train"], env=_stage_env(request, s3_server, work, threads),
                              stdout=log, stderr=subprocess.STDOUT, timeout=900).returncode
    wall = time.perf_counter() - started
    text = log_path.read_text(errors="replace")
    if code != 0:
        raise RuntimeError(f"the train stage exited with {code}:\n{text[-3000:]}")
    result = StageResult.from_termination_message((work / "termination-log").read_text())
    timings = timings_from_log(text)
    return {"wall_seconds": wall, "metrics": result.metrics, "timings": timings}


def _warm_deepspeed_ops(env: dict) -> float:
    """DeepSpeed's CPU accelerator JIT-builds its shared-memory comm op the first time on a machine (minutes,
    with a C++ compiler). Build it here so it lands in neither measurement; return what it took."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                   env=env, capture_output=True, check=False, timeout=900)
    return time.perf_counter() - started


def bench_train(posts: int = 3000, epochs: int = 2, runs: int = 2, threads: int = 2, bf16_run: bool = False) -> dict:
    """Tokens/s and wall time of the real train stage (its defaults; epochs set to `epochs`) against
    huggingtweets' way on the same training posts (the stage's own train split) and the same tiny GPT-2.

    Both train on the same blocks for the same epochs, so the token counts are equal and have no padding.
    Ours: tokens / the seconds of the stage's trainer.train() (DeepSpeed init, steps, per-epoch evaluation);
    the baseline: tokens / the seconds of its trainer.train(). Runs alternate and the best of `runs` each
    counts (a shared machine only ever makes a run slower). With `bf16_run`, one more stage run with the
    bot setting `precision: bf16` (the default, auto, is fp32 on CPU) shows what this CPU's bf16 would give."""
    import boto3  # noqa: F401  (fail early without the test extra)

    from tweetbot_trainer.contract import S3Layout, StageRequest
    from tweetbot_trainer.train import TrainArguments, split_posts

    from .tiny_model import build_tiny_gpt2

    work = Path(tempfile.mkdtemp(prefix="tweetbot-bench-train-"))
    texts = generated_posts(posts)
    defaults = TrainArguments()
    model_dir = build_tiny_gpt2(work / "model", texts, **TINY)
    train_posts, _ = split_posts(texts, defaults.validation_fraction, defaults.seed)
    (work / "train-posts.json").write_text(json.dumps(train_posts))
    (work / "train-blocks.json").write_text(json.dumps(stage_blocks(model_dir, texts, defaults).train))
    try:
        with local_s3(work) as (server, s3):
            bucket = "bench"
            s3.create_bucket(Bucket=bucket)
            for path in model_dir.iterdir():
                s3.upload_file(str(path), bucket, f"base/tiny-gpt2/{path.name}")

            def request(run: int, **training) -> StageRequest:
                layout = S3Layout(bucket=bucket, prefix="tweetbot", namespace="bench", bot="dreamer", run_id=f"run-{run}",
                                  endpoint=server.endpoint)
                body = "".join(json.dumps({"handle": "dreamer", "id": str(i), "text": t}) + "\n" for i, t in enumerate(texts))
                s3.put_object(Bucket=bucket, Key=layout.dataset, Body=body.encode())
                s3.put_object(Bucket=bucket, Key=layout.key("data", "manifest.json"), Body=b"{}")
                # What the operator sends for a bot that sets only `epochs` (the CRD defaults fill the rest).
                return StageRequest(stage="train", run_id=layout.run_id, namespace="bench", bot="dreamer", handles=["dreamer"],
                                    s3=layout, model={"name": f"s3://{bucket}/base/tiny-gpt2/", "revision": "main"},
                                    data={}, training={"epochs": epochs, **training}, gpus=0)

            env = _stage_env(request(0), server, work, threads)
            op_build = _warm_deepspeed_ops(env)
            baseline_env = {**env, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": "29519"}
            baseline_env.pop("TWEETBOT_REQUEST")
            ours_runs, baseline_runs, floor_runs = [], [], []
            for run in range(runs):
                floor_runs.append(_in_process("_floor_train", baseline_env, str(model_dir), str(work / "train-blocks.json"),
                                              epochs, defaults.batch_size, defaults.learning_rate, defaults.seed))
                baseline_runs.append(_in_process("_baseline_train", baseline_env, str(model_dir), str(work / "train-posts.json"),
                                                 epochs, defaults.seed))
                ours_runs.append(_run_stage(request(run + 1), server, work, threads))
            bf16 = _run_stage(request(runs + 1, precision="bf16"), server, work, threads) if bf16_run else None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def train_call(run: dict) -> float:
        """The stage's trainer.train(): DeepSpeed set-up, the steps, the per-epoch evaluations (the stage does not
        evaluate again after it), checkpoint saves and the wait for their uploads."""
        seconds = run["timings"]["seconds"]
        return sum(seconds.get(name, 0.0) for name in ("engineInit", "trainingSteps", "eval", "checkpointSave", "checkpointUploadWait"))

    ours = min(ours_runs, key=train_call)
    baseline = min(baseline_runs, key=lambda run: run["seconds"])
    tokens = ours["metrics"]["tokens"]
    if tokens != baseline["tokens"]:
        raise RuntimeError(f"the stage trained {tokens} tokens and the baseline {baseline['tokens']}: not the same data")
    # Against the floor, each side's fastest whole process.
    stage = min(ours_runs, key=lambda run: run["wall_seconds"])
    floor = min(floor_runs, key=lambda run: run["wall_seconds"])
    if floor["steps"] != stage["metrics"]["steps"]:
        raise RuntimeError(f"the stage ran {stage['metrics']['steps']} steps and the floor {floor['steps']}: not the same work")
    stage_fixed = stage["wall_seconds"] - stage["timings"]["seconds"]["trainingSteps"]
    floor_fixed = floor["wall_seconds"] - floor["steps_seconds"]
    ours_seconds, baseline_seconds = train_call(ours), baseline["seconds"]
    timings = ours["timings"]
    steps_seconds = timings["seconds"]["trainingSteps"]
    return {
        "tokens": tokens, "epochs": epochs, "posts": len(train_posts), "block_size": baseline["block_size"],
        "model": TINY, "threads": threads, "runs": runs,
        "tokens_per_second": round(tokens / ours_seconds), "baseline_tokens_per_second": round(tokens / baseline_seconds),
        "speedup": round(baseline_seconds / ours_seconds, 2),
        "seconds": round(ours_seconds, 1), "baseline_seconds": round(baseline_seconds, 1),
        # The training steps alone (no DeepSpeed init, no evaluation) against the baseline's whole train().
        "steps_tokens_per_second": round(tokens / steps_seconds), "steps_speedup": round(baseline_seconds / steps_seconds, 2),
        "stage_wall_seconds": round(ours["wall_seconds"], 1), "baseline_wall_seconds": round(baseline["wall_seconds"], 1),
        "wall_ratio": round(ours["wall_seconds"] / baseline["wall_seconds"], 2),
        "train_loss": ours["metrics"]["trainLoss"], "baseline_train_loss": round(baseline["train_loss"], 4),
        "eval_loss": ours["metrics"].get("evalLoss"),
        "steps": ours["metrics"]["steps"], "baseline_steps": baseline["steps"],
        "all_runs_seconds": {"ours": [round(train_call(r), 1) for r in ours_runs],
                             "baseline": [round(r["seconds"], 1) for r in baseline_runs]},
        "floor": {"wall_seconds": round(floor["wall_seconds"], 2), "steps_seconds": round(floor["steps_seconds"], 2),
                  "fixed_seconds": round(floor_fixed, 2), "train_loss": round(floor["train_loss"], 4),
                  "stage_wall_seconds": round(stage["wall_seconds"], 2), "stage_fixed_seconds": round(stage_fixed, 2),
                  "stage_steps_seconds": round(stage["timings"]["seconds"]["trainingSteps"], 2),
                  "wall_ratio": round(stage["wall_seconds"] / floor["wall_seconds"], 2),
                  "fixed_ratio": round(stage_fixed / floor_fixed, 2),
                  "all_runs_wall_seconds": {"stage": [round(r["wall_seconds"], 2) for r in ours_runs],
                                            "floor": [round(r["wall_seconds"], 2) for r in floor_runs]}},
        "deepspeed_op_build_seconds": round(op_build, 1),
        "bf16": None if bf16 is None else {
            "tokens_per_second": round(tokens / train_call(bf16)), "speedup": round(baseline_seconds / train_call(bf16), 2),
            "steps_tokens_per_second": round(tokens / bf16["timings"]["seconds"]["trainingSteps"]),
            "train_loss": bf16["metrics"]["trainLoss"], "eval_loss": bf16["metrics"].get("evalLoss")},
        # Where the stage's wall time went (the process, from its start), and the share outside the steps.
        "phases": {"seconds": timings["seconds"], "share": timings["share"], "total_seconds": timings["totalSeconds"],
                   "outside_loop_share": timings["outsideLoopShare"]},
    }


# --- S3 checkpoint upload ------------------------------------------------------------------------------------

# A GPT-2 (124M) checkpoint as the stage saves it with ZeRO-2 in bf16, scaled to `scale` of its size: the
# weights, DeepSpeed's model states and fp32 optimizer partition (master weights and two Adam moments), and
# the small files.
CHECKPOINT_FILES = {
    "model.safetensors": 498_000_000,
    "global_step100/mp_rank_00_model_states.pt": 250_000_000,
    "global_step100/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": 1_494_000_000,
    "scheduler.pt": 1_500,
    "rng_state.pth": 15_000,
    "trainer_state.json": 2_000,
    "training_args.bin": 6_000,
    "config.json": 900,
    "generation_config.json": 200,
    "tokenizer.json": 3_500_000,
    "tokenizer_config.json": 500,
    "latest": 15,
    "zero_to_fp32.py": 30_000,
}


def write_checkpoint(directory: Path, scale: float = 1.0) -> int:
    """Incompressible files of CHECKPOINT_FILES' sizes times `scale`; returns the total bytes."""
    chunk = os.urandom(16 * 1024 * 1024)
    total = 0
    for name, size in CHECKPOINT_FILES.items():
        size = max(1, int(size * scale))
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as file:
            left = size
            while left:
                file.write(chunk[:min(left, len(chunk))])
                left -= min(left, len(chunk))
        total += size
    return total


@contextmanager
def _environment(**values: str):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def bench_s3_upload(scale: float = 0.4, runs: int = 2) -> dict:
    """MB/s of Storage.upload_directory (what uploads every checkpoint and the final model) against one
    single-stream boto3 put_object per file, to a local MinIO, best of `runs` each, alternating."""
    from tweetbot_trainer.storage import TRANSFER, Storage

    work = Path(tempfile.mkdtemp(prefix="tweetbot-bench-s3-"))
    local = work / "checkpoint"
    try:
        total = write_checkpoint(local, scale)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        largest = max(p.stat().st_size for p in files)
        ours_seconds, baseline_seconds = [], []
        with local_s3(work) as (server, s3):
            s3.create_bucket(Bucket="bench")
            with _environment(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key):
                storage = Storage(server.endpoint)  # the stage's own client: credentials from the environment
            for run in range(runs):
                started = time.perf_counter()
                for path in files:
                    with open(path, "rb") as body:
                        s3.put_object(Bucket="bench", Key=f"baseline-{run}/{path.relative_to(local).as_posix()}", Body=body)
                baseline_seconds.append(time.perf_counter() - started)
                storage.delete_prefix("bench", f"baseline-{run}/")

                started = time.perf_counter()
                storage.upload_directory(local, "bench", f"ours-{run}/", manifest_key=f"ours-{run}/manifest.json")
                ours_seconds.append(time.perf_counter() - started)
                storage.delete_prefix("bench", f"ours-{run}/")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours, baseline = min(ours_seconds), min(baseline_seconds)
    return {
        "bytes": total, "files": len(files), "largest_file_bytes": largest,
        "mb_per_second": round(total / ours / 1e6, 1), "baseline_mb_per_second": round(total / baseline / 1e6, 1),
        "speedup": round(baseline / ours, 2), "seconds": round(ours, 2), "baseline_seconds": round(baseline, 2),
        "all_runs_seconds": {"ours": [round(s, 2) for s in ours_seconds], "baseline": [round(s, 2) for s in baseline_seconds]},
        "transfer": {"multipart_threshold": TRANSFER.multipart_threshold, "multipart_chunksize": TRANSFER.multipart_chunksize,
                     "max_concurrency": TRANSFER.max_concurrency},
    }


def _ratio(speedup: float) -> str:
    return f"{speedup}x faster" if speedup >= 1 else f"{speedup}x (slower)"


def rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    """Table rows (benchmark, ours, baseline, ratio, what the baseline is) for bench.print_table."""
    out = []
    train = results.get("train")
    if train:
        out += [
            ("train (tokens/s)", f"{train['tokens_per_second']:,}", f"{train['baseline_tokens_per_second']:,}",
             _ratio(train['speedup']), "huggingtweets: batch 1, max-length blocks, plain Trainer, fp32"),
            ("train steps only (tok/s)", f"{train['steps_tokens_per_second']:,}", f"{train['baseline_tokens_per_second']:,}",
             _ratio(train['steps_speedup']), "the same, against the stage's steps without init or eval"),
            ("train stage wall (s)", f"{train['stage_wall_seconds']}", f"{train['baseline_wall_seconds']}",
             f"{train['wall_ratio']}x the time", f"whole processes; same {train['tokens']:,} tokens, tiny GPT-2, CPU"),
            ("train stage vs floor (s)", f"{train['floor']['stage_wall_seconds']}", f"{train['floor']['wall_seconds']}",
             f"{train['floor']['wall_ratio']}x the time", "floor: imports, model from disk, the same steps in a plain loop"),
            ("train fixed cost vs floor (s)", f"{train['floor']['stage_fixed_seconds']}", f"{train['floor']['fixed_seconds']}",
             f"{train['floor']['fixed_ratio']}x the time", "wall time less the training steps, both processes"),
            ("outside the loop (%)", f"{100 * train['phases']['outside_loop_share']:.0f}", "", "",
             "share of the stage's wall time not in training steps"),
        ]
    s3 = results.get("s3_upload")
    if s3:
        out.append(("checkpoint upload (MB/s)", f"{s3['mb_per_second']:,}", f"{s3['baseline_mb_per_second']:,}",
                    _ratio(s3['speedup']), f"one put_object per file; {s3['bytes'] / 1e6:,.0f} MB in {s3['files']} files"))
    return out
