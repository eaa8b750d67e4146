"""The queue between watch events and reconciles, with client-go's workqueue rules: a bot is queued at most
once, is handled by one worker at a time, and a bot queued again while being handled is handled again after.
On top: a bot seen for the first time goes before the ones already running (their Jobs' progress can wait a
moment, a new bot's first Job should not), at most `max_updates` passes over running bots go at once (the
other workers stay free for new bots, and the API server is not busy with status writes while bots arrive),
and a request that only echoes our own write can be dropped.

It reports itself as client-go's workqueue does (metrics.py): keys waiting, adds, how long a key waited and how
long a worker held it. A key queued again while handled waits from that add, and is not added twice.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import metrics
from .cache import Key

NEW, UPDATE = 0, 1  # priorities: lower first


@dataclass(frozen=True)
class Request:
    priority: int = UPDATE
    echo_of: str | None = None  # the bot's resourceVersion in the event, when the event may be our own write's echo
    fresh: bool = False  # read the bot and its Jobs from the API server, not from the watch cache

    def merge(self, other: Request) -> Request:
        # Two reasons to look are a real one, unless both are the same echo.
        return Request(min(self.priority, other.priority), self.echo_of if self.echo_of == other.echo_of else None,
                       self.fresh or other.fresh)


class WorkQueue:
    def __init__(self, max_updates: int = 0, name: str = "tweetbots", clock: Callable[[], float] = time.monotonic):
        self.name, self._clock = name, clock
        self._depth, self._adds = metrics.QUEUE_DEPTH.labels(name), metrics.QUEUE_ADDS.labels(name)
        self._waits, self._works = metrics.QUEUE_WAIT.labels(name), metrics.QUEUE_WORK.labels(name)
        self._added_at: dict[Key, float] = {}  # when each waiting key (queued, or again) was added
        self._started_at: dict[Key, float] = {}  # when a worker took each key being handled
        self._max_updates = max_updates  # 0: no limit
        self._updates: set[Key] = set()  # being handled for an UPDATE request
        self._cond = threading.Condition()
        self._heap: list[tuple[int, int, Key]] = []
        self._order = itertools.count()
        self._queued: dict[Key, Request] = {}
        self._processing: set[Key] = set()
        self._again: dict[Key, Request] = {}  # re-queued while being handled
        self._closed = False

    def add(self, key: Key, request: Request = Request()) -> None:
        with self._cond:
            if key not in self._again and key not in self._queued:
                self._adds.inc()
                self._added_at[key] = self._clock()
            self._wait(key, request)
            self._depth.set(len(self._queued) + len(self._again))

    def _wait(self, key: Key, request: Request) -> None:
        """Queue the key, or mark it to go again once handled (with the lock held)."""
        waiting = self._again if key in self._processing else self._queued
        old = waiting.get(key)
        waiting[key] = request if old is None else old.merge(request)
        if waiting is self._queued and (old is None or request.priority < old.priority):
            heapq.heappush(self._heap, (waiting[key].priority, next(self._order), key))
            self._cond.notify()

    def get(self) -> tuple[Key, Request] | None:
        """The next key and why, once one is queued; None once the queue is closed."""
        with self._cond:
            while True:
                while self._heap:
                    priority, _, key = self._heap[0]
                    request = self._queued.get(key)
                    if request is None or request.priority != priority:
                        heapq.heappop(self._heap)  # stale: the key went out, or was pushed again with a better priority
                        continue
                    if priority == UPDATE and self._max_updates and len(self._updates) >= self._max_updates:
                        break  # nothing new is queued (it would be on top): wait for a new bot or a free update slot
                    heapq.heappop(self._heap)
                    del self._queued[key]
                    self._processing.add(key)
                    if priority == UPDATE:
                        self._updates.add(key)
                    now = self._clock()
                    self._waits.observe(now - self._added_at.pop(key, now))
                    self._started_at[key] = now
                    self._depth.set(len(self._queued) + len(self._again))
                    return key, request
                if self._closed:
                    return None
                self._cond.wait()

    def done(self, key: Key) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._started_at:
                self._works.observe(self._clock() - self._started_at.pop(key))
            if key in self._updates:
                self._updates.discard(key)
                self._cond.notify()
            again = self._again.pop(key, None)
            if again is not None:
                self._wait(key, again)  # already counted, and waiting since that add

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queued)
