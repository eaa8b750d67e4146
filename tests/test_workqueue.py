"""The operator's work queue: each bot once, one worker per bot, new bots first, echoes merged away."""

import threading

from prometheus_client import REGISTRY

from tweetbot_operator.workqueue import NEW, UPDATE, Request, WorkQueue


def test_a_bot_is_queued_once_and_new_bots_go_first():
    queue = WorkQueue()
    queue.add(("ns", "old"), Request(UPDATE))
    queue.add(("ns", "old"), Request(UPDATE))
    queue.add(("ns", "new"), Request(NEW))
    assert len(queue) == 2
    assert queue.get()[0] == ("ns", "new")
    assert queue.get()[0] == ("ns", "old")
    assert len(queue) == 0


def test_a_queued_bot_raised_to_new_moves_ahead():
    queue = WorkQueue()
    queue.add(("ns", "a"), Request(UPDATE))
    queue.add(("ns", "b"), Request(UPDATE))
    queue.add(("ns", "b"), Request(NEW))
    assert [queue.get()[0] for _ in range(2)] == [("ns", "b"), ("ns", "a")]
    queue.close()
    assert queue.get() is None  # the stale heap entry of b is skipped, not handed out twice


def test_echoes_merge_into_a_real_reason_and_fresh_sticks():
    queue = WorkQueue()
    queue.add(("ns", "a"), Request(echo_of="7"))
    queue.add(("ns", "a"), Request(echo_of="7"))
    assert queue.get()[1].echo_of == "7"
    queue.done(("ns", "a"))
    queue.add(("ns", "a"), Request(echo_of="7"))
    queue.add(("ns", "a"), Request(fresh=True))
    request = queue.get()[1]
    assert request.echo_of is None and request.fresh


def test_a_bot_added_while_handled_comes_back_after_done_and_never_to_two_workers():
    queue = WorkQueue()
    queue.add(("ns", "a"))
    key, _ = queue.get()
    queue.add(("ns", "a"), Request(fresh=True))
    assert len(queue) == 0  # not handed to a second worker meanwhile
    got = []
    worker = threading.Thread(target=lambda: got.append(queue.get()))
    worker.start()
    queue.done(key)
    worker.join(timeout=5)
    assert got and got[0][0] == ("ns", "a") and got[0][1].fresh


def test_updates_wait_for_a_free_slot_while_new_bots_still_go_at_once():
    queue = WorkQueue(max_updates=1)
    queue.add(("ns", "running-1"), Request(UPDATE))
    queue.add(("ns", "running-2"), Request(UPDATE))
    first, _ = queue.get()
    got = []
    worker = threading.Thread(target=lambda: got.append(queue.get()))
    worker.start()
    worker.join(timeout=0.3)
    assert worker.is_alive() and not got  # the second update waits: one is being handled
    queue.add(("ns", "new"), Request(NEW))
    worker.join(timeout=5)
    assert got[0][0] == ("ns", "new")  # a new bot does not wait for the slot
    queue.done(("ns", "new"))
    worker = threading.Thread(target=lambda: got.append(queue.get()))
    worker.start()
    queue.done(first)
    worker.join(timeout=5)
    assert got[1][0] == ("ns", "running-2")  # handed out once the slot is free


# Metrics, as client-go's workqueue reports them ------------------------------------------------------------------

def sample(metric: str, queue: WorkQueue) -> float:
    return REGISTRY.get_sample_value(metric, {"name": queue.name}) or 0.0


def test_depth_adds_and_waits_move_as_keys_come_and_go():
    now = [100.0]
    queue = WorkQueue(name="test-depth", clock=lambda: now[0])
    queue.add(("ns", "a"))
    queue.add(("ns", "a"))  # already queued: not an add
    queue.add(("ns", "b"), Request(NEW))
    assert sample("tweetbot_workqueue_depth", queue) == 2
    assert sample("tweetbot_workqueue_adds_total", queue) == 2
    now[0] += 3
    key, _ = queue.get()  # b, the new bot
    assert sample("tweetbot_workqueue_depth", queue) == 1
    assert sample("tweetbot_workqueue_queue_duration_seconds_count", queue) == 1
    assert sample("tweetbot_workqueue_queue_duration_seconds_sum", queue) == 3
    queue.add(key)  # again while handled: waits, and counts as an add
    assert sample("tweetbot_workqueue_depth", queue) == 2
    assert sample("tweetbot_workqueue_adds_total", queue) == 3
    now[0] += 5
    queue.done(key)  # its second turn is queued without a second add
    assert sample("tweetbot_workqueue_adds_total", queue) == 3
    assert sample("tweetbot_workqueue_work_duration_seconds_count", queue) == 1
    assert sample("tweetbot_workqueue_work_duration_seconds_sum", queue) == 5
    assert [queue.get()[0] for _ in range(2)] == [("ns", "a"), key]
    assert sample("tweetbot_workqueue_depth", queue) == 0
    # a waited 8s, and b's second turn 5s, from its add while it was being handled
    assert sample("tweetbot_workqueue_queue_duration_seconds_sum", queue) == 3 + 8 + 5
