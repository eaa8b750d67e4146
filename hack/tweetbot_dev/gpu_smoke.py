"""A smoke run for a machine with a GPU: the train stage's defaults against huggingtweets' settings.

    pip install -e '.[trainer]' && PYTHONPATH=hack python -m tweetbot_dev.gpu_smoke [--model gpt2] [--steps 300]

Each setting trains `--model` (from the Hub or a local path) for `--steps` steps on generated posts, in a
process of its own, and prints tokens/s and peak memory:
- tweetbot: `TrainArguments`' defaults as the stage runs them (batch 4, blocks of 512, `precision: auto`;
  one process: the plain Trainer, on a GPU or the CPU);
- huggingtweets: batch 1, blocks of the model's whole context, transformers' plain Trainer, fp32;
- zero2 and plain (`--settings zero2,plain`): the stage's defaults with DeepSpeed ZeRO-2 forced on, and off;
- lora (`--settings plain,lora`): the stage's defaults with `method: lora` (peft's adapters, r 8, alpha 16).
Each setting also saves one checkpoint after its last step, as the stage does (weights and optimizer state), and
prints its size; the save is not in the tokens/s. Tokens per CPU second (all of the process's threads) is the
figure to compare on a machine that other work shares: wall-clock tokens/s there swings with the other load.
Without a GPU it refuses, unless `--allow-cpu`: what the tests use, and how the choice of the plain Trainer
for one process was measured (`--allow-cpu --model <tiny GPT-2> --settings zero2,plain --repeat 3`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench_trainer import generated_posts as posts

SETTINGS = ("tweetbot", "huggingtweets", "zero2", "plain", "lora")


def run_one(setting: str, model_name: str, steps: int, count: int) -> dict:
    """Train in this process; tokens/s over trainer.train() and the peak memory of the device it used."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from tweetbot_trainer.train import (BlockDataset, TrainArguments, load_model_and_tokenizer, make_blocks,
                                        single_process_group, skip_shared_memory_comm, training_arguments)

    cuda = torch.cuda.is_available()
    if setting == "zero2":  # DeepSpeed wants a process group, as in the stage
        single_process_group()
        skip_shared_memory_comm(cuda)
    model, tokenizer = load_model_and_tokenizer(model_name, "main")
    output_dir = tempfile.mkdtemp(prefix=f"tweetbot-gpu-smoke-{setting}-")
    if setting != "huggingtweets":
        args = TrainArguments(model_name=model_name, validation_fraction=0.0, zero_asked=setting == "zero2",
                              method="lora" if setting == "lora" else "full")
        if args.lora:
            from tweetbot_trainer.lora import with_adapters

            model = with_adapters(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
        blocks = make_blocks(posts(count), tokenizer, model, args)
        kwargs = training_arguments(args, output_dir, len(blocks.train), False, 1, cuda=cuda)
        if setting == "plain":
            kwargs["deepspeed"] = None
    else:
        args = TrainArguments(model_name=model_name, batch_size=1, block_size=10**9, validation_fraction=0.0)
        blocks = make_blocks(posts(count), tokenizer, model, args)
        kwargs = dict(output_dir=output_dir, per_device_train_batch_size=1, learning_rate=args.learning_rate,
                      lr_scheduler_type="linear", seed=args.seed, save_strategy="no", report_to=[], disable_tqdm=True,
                      use_cpu=not cuda)
    class LastStep(TrainerCallback):
        """When the last step ended: the checkpoint saved after it is not in the tokens/s."""

        ended = cpu_ended = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                self.ended, self.cpu_ended = time.perf_counter(), time.process_time()

    # One checkpoint, after the last step: what the stage saves and uploads each time.
    kwargs.update(max_steps=steps, save_strategy="steps", save_steps=steps, logging_strategy="no")
    clock = LastStep()
    trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=BlockDataset(blocks.train),
                      callbacks=[clock])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = clock.ended - started, clock.cpu_ended - cpu_started
    checkpoint = Path(output_dir) / f"checkpoint-{trainer.state.global_step}"
    checkpoint_bytes = sum(path.stat().st_size for path in checkpoint.rglob("*") if path.is_file())
    shutil.rmtree(output_dir, ignore_errors=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens = trainer.state.global_step * args.batch_size * blocks.size * world
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"setting": setting, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "engine": "DeepSpeed" if kwargs.get("deepspeed") else "Trainer",
            "precision": "bf16" if kwargs.get("bf16") else "fp16" if kwargs.get("fp16") else "fp32",
            "batch": args.batch_size, "block": blocks.size, "steps": trainer.state.global_step,
            "tokens_per_second": round(tokens / seconds, 1), "tokens_per_cpu_second": round(tokens / cpu_seconds, 1),
            "peak_memory_mb": round(peak / 2**20),
            "checkpoint_mb": round(checkpoint_bytes / 2**20, 2)}



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tweetbot_dev.gpu_smoke", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--posts", type=int, default=20_000, help="generated posts to draw the blocks from")
    parser.add_argument("--settings", default="tweetbot,huggingtweets", help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each setting, interleaved")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (for tests, with a tiny model)")
    parser.add_argument("--one", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.model, args.steps, args.posts)))
        return 0
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no GPU visible to torch: this smoke run is for a GPU machine (--allow-cpu to run anyway)", file=sys.stderr)
        return 2
    env = {**os.environ, **({} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu"})}
    settings = args.settings.split(",")
    unknown = set(settings) - set(SETTINGS)
    if unknown or len(settings) < 2:
        parser.error(f"--settings: two or more of {', '.join(SETTINGS)}")
    results = []
    for setting in settings * args.repeat:  # a process each: DeepSpeed's state and the peak memory start afresh
        done = subprocess.run([sys.executable, "-m", "tweetbot_dev.gpu_smoke", "--one", setting, "--model", args.model,
                               "--steps", str(args.steps), "--posts", str(args.posts)],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'setting':14} {'device':20} {'engine':9} {'precision':9} {'batch':>5} {'block':>5} {'steps':>5} "
          f"{'tokens/s':>10} {'tok/CPU-s':>10} {'peak MB':>8} {'ckpt MB':>9}")
    for r in results:
        print(f"{r['setting']:14} {r['device'][:20]:20} {r['engine']:9} {r['precision']:9} {r['batch']:>5} {r['block']:>5} "
              f"{r['steps']:>5} {r['tokens_per_second']:>10,.0f} {r['tokens_per_cpu_second']:>10,.0f} "
              f"{r['peak_memory_mb']:>8,} {r['checkpoint_mb']:>9,.2f}")

    def median(setting: str, key: str) -> float:
        return statistics.median(r[key] for r in results if r["setting"] == setting)

    first, second = settings[:2]
    for key, what in (("peak_memory_mb", "peak memory"), ("checkpoint_mb", "checkpoint size"),
                      ("tokens_per_cpu_second", "tokens per CPU second"), ("tokens_per_second", "tokens/s")):
        print(f"{first} / {second} {what} (medians): {median(first, key) / median(second, key):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
