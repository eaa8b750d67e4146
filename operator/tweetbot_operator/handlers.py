"""The kopf wiring: settings at start-up, watch events handed to the `Controller`, the resync loop.

Bots and Jobs are handled from raw watch events only, so kopf keeps no bookkeeping on them (no annotations,
no finalizer of its own, no diff of every change); our finalizer is the plan's.
"""

from __future__ import annotations

import asyncio
import logging

import kopf
from kubernetes import client, config

from tweetbot_trainer.contract import BOT_LABEL, GROUP

from . import artifacts, metrics
from .controller import Controller
from .kube import Kube
from .names import PLURAL, VERSION
from .settings import Settings

log = logging.getLogger("tweetbot.operator")
SETTINGS = Settings.from_env()


class _NoDiffBase(kopf.DiffBaseStorage):
    """kopf deep-copies every event's whole body to diff it against the last handled one, which only
    create/update handlers use; with raw event handlers alone the copy is waste (9% of the operator's py-spy
    samples at 1,000 bots)."""

    def build(self, *, body, extra_fields=None):
        return {}

    def fetch(self, *, body):
        return {}

    def store(self, *, body, patch, essence) -> None:
        pass


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    # Only our own events (phase changes, warnings) reach `kubectl describe`, not kopf's per-handler chatter,
    # and its "handler succeeded" line per watch event stays out of the log.
    settings.posting.level = logging.WARNING
    settings.persistence.diffbase_storage = _NoDiffBase()
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # kopf waits this long after an object's event for more before handling it; our queue merges bursts.
    settings.batching.batch_window = 0.01
    # An object's kopf worker (holding the object's last body) lives this long after its last event: with
    # thousands of Jobs changing within a minute, kopf's 5 s default keeps most of them in memory at once.
    settings.batching.idle_timeout = 0.5
    memo.controller = await asyncio.to_thread(_start_controller)
    memo.resync = asyncio.create_task(_resync_forever(memo.controller))
    metrics.serve(SETTINGS.metrics_port)
    log.info("operator started: namespaces=%s trainer image=%s", SETTINGS.namespaces or "all", SETTINGS.trainer_image)


def _start_controller() -> Controller:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = SETTINGS.workers + 2  # one per worker, the resync loop, the deletions
    api = client.ApiClient(configuration)
    api.user_agent = "tweetbot-operator"
    controller = Controller(Kube(api), SETTINGS, artifacts)
    controller.start()
    return controller


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_) -> None:
    memo.resync.cancel()
    memo.controller.queue.close()
    memo.controller.kube.api.close()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def bot_event(event: dict, memo: kopf.Memo, **_) -> None:
    """Every change of a bot, and every bot once at start-up, is a reason to reconcile it: level-based, so a
    missed or repeated event does no harm."""
    memo.controller.bot_event(event["type"], event["object"])


@kopf.on.event("batch", "v1", "jobs", labels={BOT_LABEL: kopf.PRESENT})
async def job_changed(event: dict, memo: kopf.Memo, **_) -> None:
    memo.controller.job_event(event["type"], event["object"])


async def _resync_forever(controller: Controller) -> None:
    """Not a kopf timer: those put a finalizer on every bot, and then no bot could be deleted while the
    operator is down or uninstalled."""
    while True:
        await asyncio.sleep(SETTINGS.timer_seconds)
        try:
            await asyncio.to_thread(controller.resync)
        except Exception as error:
            log.warning("resync could not list bots (%s); trying again in %.0fs", type(error).__name__, SETTINGS.timer_seconds)
