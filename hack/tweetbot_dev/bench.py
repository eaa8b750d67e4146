"""Benchmarks (`tweetbot bench ...`), never tests: every figure is printed beside a baseline measured in
the same run on the same machine, as a ratio."""

from __future__ import annotations

import json
import re
import time

import requests

from tweetbot_trainer.cleaning import curate
from tweetbot_trainer.sources import Post
from tweetbot_trainer.sources.x_api import XApiSource

from .fakes import FakeAccount, FakePost, FakeSocialServer


def _huggingtweets_clean(tweet: str) -> str:
    """The baseline: huggingtweets' per-tweet cleaning as its notebook wrote it (five regex passes per
    link prefix with patterns built on every call, then a split/join)."""
    tweet = tweet.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    for prefix in ("http:", "https:"):
        tweet = re.sub(f" {prefix}\\S+", "", tweet)
        tweet = re.sub(f"{prefix}\\S+ ", "", tweet)
        tweet = re.sub(f"\n{prefix}\\S+ ", "", tweet)
        tweet = re.sub(f"\n{prefix}\\S+", "", tweet)
        tweet = re.sub(f"{prefix}\\S+", "", tweet)
    tweet = re.sub(" +", " ", tweet)
    return " ".join(tweet.split()).strip()


def _huggingtweets_boring(tweet: str) -> bool:
    return len([None for w in tweet.split() if all(bs not in w.lower() for bs in ("http", "@", "#"))]) < 3


def _sample_posts(count: int) -> list[Post]:
    words = "my dream is to build a small robot that writes posts about cats and coffee every morning".split()
    posts = []
    for i in range(count):
        text = " ".join(words[(i * 7 + k) % len(words)] for k in range(5 + i % 20))
        if i % 5 == 0:
            text += f" https://t.co/{i:08x}"
        if i % 11 == 0:
            text = "@friend " + text + " &amp; #tag"
        posts.append(Post(str(i), "RT @x: " + text if i % 13 == 0 else text, i % 13 == 0))
    return posts


def _best_of(runs: int, work) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def bench_scrape(posts: int = 100_000, fetch_posts: int = 3200, runs: int = 3) -> dict:
    sample = _sample_posts(posts)

    def ours():
        curate("bench", sample)

    def baseline():
        kept = [t for t in (p.text for p in sample) if not t.startswith("RT @")]
        [t for t in (_huggingtweets_clean(t) for t in kept) if not _huggingtweets_boring(t)]

    ours_s, baseline_s = _best_of(runs, ours), _best_of(runs, baseline)

    account = FakeAccount("bench", "Bench", [FakePost(10**6 - i, f"post {i} with a few words") for i in range(fetch_posts)])
    with FakeSocialServer({"bench": account}) as server:
        def client_fetch():
            assert len(XApiSource(server.url, server.x_bearer_token).fetch("bench", fetch_posts).posts) == fetch_posts

        def raw_fetch():
            # The floor: the same 32 page requests with a bare requests.Session and no parsing into posts.
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {server.x_bearer_token}"
            session.get(f"{server.url}/2/users/by/username/bench").json()
            token = None
            while True:
                params = {"max_results": 100, **({"pagination_token": token} if token else {})}
                token = session.get(f"{server.url}/2/users/1000/tweets", params=params).json()["meta"].get("next_token")
                if not token:
                    break

        fetch_s, raw_s = _best_of(runs, client_fetch), _best_of(runs, raw_fetch)

    return {
        "cleaning": {"posts": posts, "posts_per_second": round(posts / ours_s),
                     "baseline_posts_per_second": round(posts / baseline_s), "speedup": round(baseline_s / ours_s, 2)},
        "fetch_3200": {"posts": fetch_posts, "seconds": round(fetch_s, 3), "baseline_seconds": round(raw_s, 3),
                       "overhead_ratio": round(fetch_s / raw_s, 2)},
    }


def print_table(results: dict) -> None:
    cleaning, fetch = results["cleaning"], results["fetch_3200"]
    rows = [
        ("cleaning (posts/s)", f"{cleaning['posts_per_second']:,}", f"{cleaning['baseline_posts_per_second']:,}",
         f"{cleaning['speedup']}x faster", "huggingtweets' clean_tweet + boring_tweet"),
        ("fetch 3,200 posts (s)", f"{fetch['seconds']}", f"{fetch['baseline_seconds']}",
         f"{fetch['overhead_ratio']}x the floor", "bare requests.Session over the same pages"),
    ]
    print(f"{'benchmark':24} {'ours':>12} {'baseline':>12}  {'ratio':18} baseline is")
    for row in rows:
        print(f"{row[0]:24} {row[1]:>12} {row[2]:>12}  {row[3]:18} {row[4]}")


def main(argv_json: str | None = None) -> dict:
    results = {"scrape": bench_scrape(), "train": bench_train()}
    print_table(results["scrape"])
    train = results["train"]
    print(f"{'train (tokens/s)':24} {train['tokens_per_second']:>12,} {train['baseline_tokens_per_second']:>12,}  "
          f"{str(train['speedup']) + 'x faster':18} huggingtweets: batch 1, max-length blocks, plain Trainer, fp32")
    print(f"{'train wall time (s)':24} {train['seconds']:>12} {train['baseline_seconds']:>12}  "
          f"{'':18} same {train['tokens']:,} tokens, tiny GPT-2 on CPU")
    if argv_json:
        with open(argv_json, "w") as file:
            json.dump(results, file, indent=1)
    return results


# --- the train stage against huggingtweets' way of training -----------------------------------------------

def _train_once(kind: str, model_dir: str, posts_file: str, epochs: int) -> dict:
    """One training run in this process; `kind` is "ours" (the stage's packing, batch 8, ZeRO-2 through
    DeepSpeed) or "huggingtweets" (batch 1, blocks of the model's maximum length, plain Trainer, fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from tweetbot_trainer.train import BlockDataset, TrainArguments, deepspeed_config, pack, tokenize_posts

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    posts = json.loads(open(posts_file).read())
    block = model.config.n_positions
    blocks = pack(tokenize_posts(tokenizer, posts), block)
    ours = kind == "ours"
    args = TrainingArguments(
        output_dir=f"/tmp/tweetbot-bench-{kind}", num_train_epochs=epochs, per_device_train_batch_size=8 if ours else 1,
        learning_rate=1.372e-4, lr_scheduler_type="cosine" if ours else "linear", save_strategy="no", report_to=[],
        logging_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
        deepspeed=deepspeed_config(TrainArguments(zero_stage=2)) if ours else None,
    )
    trainer = Trainer(model=model, args=args, train_dataset=BlockDataset(blocks))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {"tokens": len(blocks) * block * epochs, "seconds": seconds, "tokens_per_second": len(blocks) * block * epochs / seconds}


def bench_train(posts: int = 3000, epochs: int = 2) -> dict:
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from .tiny_model import build_tiny_gpt2

    words = "my dream is to build a small robot that writes posts about cats and coffee every morning".split()
    texts = [" ".join(words[(i * 7 + k) % len(words)] for k in range(6 + i % 20)) for i in range(posts)]
    work = Path(tempfile.mkdtemp(prefix="tweetbot-bench-"))
    model_dir = build_tiny_gpt2(work / "model", texts, vocab_size=2000, n_positions=256, n_embd=128, n_layer=4, n_head=4)
    (work / "posts.json").write_text(json.dumps(texts))
    results = {}
    for kind in ("huggingtweets", "ours"):
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
        code = (f"import json; from tweetbot_dev.bench import _train_once; "
                f"print('RESULT' + json.dumps(_train_once({kind!r}, {str(model_dir)!r}, {str(work / 'posts.json')!r}, {epochs})))")
        output = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        results[kind] = json.loads(output.split("RESULT", 1)[1].splitlines()[0])
    ours, baseline = results["ours"], results["huggingtweets"]
    return {"tokens": ours["tokens"], "tokens_per_second": round(ours["tokens_per_second"]),
            "baseline_tokens_per_second": round(baseline["tokens_per_second"]),
            "seconds": round(ours["seconds"], 1), "baseline_seconds": round(baseline["seconds"], 1),
            "speedup": round(ours["tokens_per_second"] / baseline["tokens_per_second"], 2)}
