"""Where the train stage's wall time goes: phases that add up to the stage's wall time, written to its log
and into final/training.json. Standard library only, so the clock starts before torch is imported."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

TIMINGS_LOG_PREFIX = "stage timings json: "


def timings_from_log(text: str) -> dict | None:
    """The stage's timing record from its log (what `run_train` writes last), or None if it has none."""
    if TIMINGS_LOG_PREFIX not in text:
        return None
    return json.loads(text.split(TIMINGS_LOG_PREFIX, 1)[1].splitlines()[0])


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

    def timed(self) -> float:
        """The seconds of every phase so far: what a span of wall time less this difference was not timed in."""
        return sum(self.seconds.values())

    @contextmanager
    def training(self, engine_ready: Callable[[], float | None]):
        """Times trainer.train(): the engine set-up until `engine_ready()` (when on_train_begin ran), then the loop,
        which is the rest once the phases timed inside it (evaluations, saves, upload waits) are taken out."""
        started, timed_before = self.clock(), self.timed()
        yield
        timed_inside = self.timed() - timed_before
        engine_init = (engine_ready() or started) - started
        self.add("engineInit", engine_init)
        self.add(self.LOOP, self.clock() - started - engine_init - timed_inside)

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
