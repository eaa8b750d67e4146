"""The GPU smoke script runs as is: here on CPU with a tiny GPT-2 (a GPU machine runs it with gpt2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tweetbot_dev.gpu_smoke import posts
from tweetbot_dev.tiny_model import build_tiny_gpt2

REPO = Path(__file__).resolve().parents[1]


def smoke(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / part) for part in ("hack", "operator", "trainer"))}
    return subprocess.run([sys.executable, "-m", "tweetbot_dev.gpu_smoke", *args], env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_smoke_run_trains_both_settings_and_prints_their_throughput(tmp_path):
    model = build_tiny_gpt2(tmp_path / "tiny", posts(200))
    done = smoke("--allow-cpu", "--model", str(model), "--steps", "3", "--posts", "400")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    tweetbot = next(line.split() for line in lines if line.startswith("tweetbot "))
    huggingtweets = next(line.split() for line in lines if line.startswith("huggingtweets "))
    assert tweetbot[2:7] == ["Trainer", "fp32", "4", "128", "3"]  # batch 4, blocks of the tiny model's whole context
    assert huggingtweets[2:7] == ["Trainer", "fp32", "1", "128", "3"]
    assert "tweetbot / huggingtweets tokens/s (medians):" in lines[-1]


def test_it_compares_the_stage_with_and_without_deepspeed(tmp_path):
    model = build_tiny_gpt2(tmp_path / "tiny", posts(200))
    done = smoke("--allow-cpu", "--model", str(model), "--steps", "2", "--posts", "400", "--settings", "zero2,plain")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("zero2 ", "plain ")) and "cpu" in line]
    engines = {row[0]: row[2] for row in rows}
    assert engines == {"zero2": "DeepSpeed", "plain": "Trainer"}


def test_it_compares_full_fine_tuning_with_lora_and_their_checkpoint_sizes(tmp_path):
    model = build_tiny_gpt2(tmp_path / "tiny", posts(200))
    done = smoke("--allow-cpu", "--model", str(model), "--steps", "2", "--posts", "400", "--settings", "plain,lora")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()
            if line.startswith(("plain ", "lora ")) and " cpu " in line}
    assert rows["plain"][2:7] == rows["lora"][2:7] == ["Trainer", "fp32", "4", "128", "2"]
    plain_mb, lora_mb = float(rows["plain"][-1]), float(rows["lora"][-1])
    assert 0 < lora_mb < plain_mb / 5  # the adapter and its optimizer state, not the whole model's
    assert "plain / lora checkpoint size (medians):" in done.stdout


def test_without_a_gpu_it_refuses_unless_told():
    done = smoke("--steps", "1")
    assert done.returncode == 2 and "no GPU visible" in done.stderr
