"""The train stage's hooks into transformers' Trainer: callbacks for checkpoints, progress and timings, and the
Trainer with its evaluations timed.

A module of its own because importing transformers takes seconds (3 s with torch): `timing.py` and
`checkpoints.py` stay free of it, and `run_train` imports this with the Trainer, inside its "trainerInit" phase.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from transformers import Trainer, TrainerCallback

from .checkpoints import CheckpointUploads, S3CheckpointStore
from .contract import Progress, S3Layout
from .storage import Storage
from .timing import PhaseTimes

log = logging.getLogger("tweetbot.train")


class TimedCheckpoints(TrainerCallback):
    """Save every `every_steps` steps (0: never by steps), and at least every `every_minutes`.

    Every rank must save at the same step (a DeepSpeed save is collective), but each reads its own clock: with
    several ranks, rank 0's decision reaches the others over a gloo group, so no GPU sync is added per step."""

    def __init__(self, every_minutes: float, every_steps: int):
        self.every_minutes, self.every_steps = every_minutes, every_steps
        self.last = time.monotonic()
        self.group = None

    def on_train_begin(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo")

    def on_step_end(self, args, state, control, **kwargs):
        every_steps = self.every_steps and state.global_step % self.every_steps == 0
        if self._agreed(every_steps or time.monotonic() - self.last >= self.every_minutes * 60):
            control.should_save = True
        return control

    def _agreed(self, due: bool) -> bool:
        """Rank 0's `due`, on every rank."""
        if self.group is None:
            return due
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(due)])
        dist.broadcast(flag, src=0, group=self.group)
        return bool(flag.item())

    def on_save(self, args, state, control, **kwargs):
        self.last = time.monotonic()


class S3Checkpoints(TrainerCallback):
    """Uploads each saved checkpoint in the background; S3 keeps the newest `keep` complete ones and local disk at
    most `keep`. Must come after TimedCheckpoints in the callbacks, so its on_step_end sees the decision to save."""

    def __init__(self, store: S3CheckpointStore, directory: Path, times: PhaseTimes, uploaded: int | None,
                 then: Sequence[Callable[[Path, int], None]] = ()):
        """`directory`: where the Trainer saves them; `uploaded`: the step S3 holds already (a resumed one); `then`:
        called with each checkpoint once S3 holds it, in the same background job, so the local copy is deleted
        only after them (the push to the Hub, TensorBoard's events). A slow one delays saves as a slow S3 would."""
        self.store, self.times, self.then = store, times, list(then)
        self.uploads = CheckpointUploads(directory, self._upload, store.keep, uploaded=uploaded)

    def _upload(self, local: Path, step: int):
        self.times.background.append(self.store.upload(local, step))
        for action in self.then:
            action(local, step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_local_process_zero:
            self.uploads.check()
            if control.should_save:
                with self.times.phase("checkpointUploadWait"):
                    self.uploads.make_room()

    def on_save(self, args, state, control, **kwargs):
        # Each rank writes its own ZeRO shards and random state into the checkpoint, in the directory the pod's
        # ranks share: once all are written, each pod's first rank uploads the pod's files (the store writes the
        # manifest last, after every pod's).
        args.distributed_state.wait_for_everyone()
        if state.is_local_process_zero:
            self.uploads.submit(state.global_step)

    def wait(self):
        with self.times.phase("checkpointUploadWait"):
            self.uploads.wait()

    def on_train_end(self, args, state, control, **kwargs):
        self.wait()


class ProgressReports(TrainerCallback):
    """Steps, loss, tokens/s and ETA to S3 for the operator, written off the training thread."""

    def __init__(self, storage: Storage, layout: S3Layout, tokens_per_step: int):
        self.storage, self.layout, self.tokens_per_step = storage, layout, tokens_per_step
        self.started = time.monotonic()
        self.first_step = None
        self.writer = ThreadPoolExecutor(max_workers=1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not state.max_steps:
            return
        if self.first_step is None:
            self.first_step, self.started = state.global_step, time.monotonic()
            return
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = (state.global_step - self.first_step) / elapsed
        progress = Progress(
            step=state.global_step, total_steps=state.max_steps, loss=(logs or {}).get("loss"),
            tokens_per_second=round(rate * self.tokens_per_step, 1),
            eta_seconds=int((state.max_steps - state.global_step) / rate) if rate > 0 else None,
            updated_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        self.writer.submit(self._write, progress.to_json().encode())

    def on_train_end(self, args, state, control, **kwargs):
        self.writer.shutdown(wait=True)  # the last report written before the stage goes on (the process ends at once)

    def _write(self, body: bytes):
        try:
            self.storage.put(self.layout.bucket, self.layout.progress, body)
        except Exception as error:  # progress is best effort: never stop training for it
            log.warning("progress report not written: %s", type(error).__name__)


class TrainTimes(TrainerCallback):
    """Times what trainer.train() does besides its steps: the engine set-up (DeepSpeed engine, optimizer, resumed
    state) until on_train_begin, and each checkpoint save. A save runs after the step's end, its logging and its
    evaluation, and on_save follows it: the save is the time from the last of those to on_save, less the phases
    timed in between (an evaluation, an upload wait)."""

    def __init__(self, times: PhaseTimes):
        self.times = times
        self.engine_ready: float | None = None
        self.since: tuple[float, float] = (times.clock(), times.timed())

    def on_train_begin(self, args, state, control, **kwargs):
        self.engine_ready = self.times.clock()

    def _mark(self):
        self.since = (self.times.clock(), self.times.timed())

    def on_step_end(self, args, state, control, **kwargs):
        self._mark()

    def on_log(self, args, state, control, **kwargs):
        self._mark()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._mark()

    def on_save(self, args, state, control, **kwargs):
        started, timed = self.since
        self.times.add("checkpointSave", self.times.clock() - started - (self.times.timed() - timed))
        self._mark()


class TimedTrainer(Trainer):
    """transformers' Trainer with each evaluation timed as the "eval" phase (no callback runs before one starts)."""

    def __init__(self, *args, times: PhaseTimes, **kwargs):
        self.times = times
        super().__init__(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with self.times.phase("eval"):
            return super().evaluate(*args, **kwargs)
