"""Where the train stage's wall time goes: the phase record written into final/training.json."""

from __future__ import annotations

import json

from tweetbot_trainer.train import PhaseTimes, last_eval_loss, seconds_since_process_start


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_phases_add_up_to_the_wall_time_and_the_loop_share_is_the_rest():
    clock = FakeClock()
    times = PhaseTimes(clock=clock, before_start=2.0)
    with times.phase("modelLoad"):
        clock.now += 3.0
    with times.phase(PhaseTimes.LOOP):
        clock.now += 10.0
    with times.phase("modelLoad"):  # a phase met twice adds up
        clock.now += 1.0
    clock.now += 4.0  # untimed work shows as "other"
    record = times.record()
    assert record["totalSeconds"] == 20.0
    assert record["seconds"] == {"processStart": 2.0, "modelLoad": 4.0, "trainingSteps": 10.0, "other": 4.0}
    assert record["share"]["trainingSteps"] == 0.5 and record["outsideLoopShare"] == 0.5
    assert abs(sum(record["share"].values()) - 1.0) < 1e-9
    json.dumps(record)  # it goes into training.json as it is
    assert times.summary().startswith("20.0s, 50% outside the training steps: processStart 2.0s, modelLoad 4.0s")


def test_a_phase_that_raises_is_still_timed_and_an_empty_record_does_not_divide_by_zero():
    clock = FakeClock()
    times = PhaseTimes(clock=clock)
    assert times.record()["outsideLoopShare"] == 0.0
    try:
        with times.phase("dataLoad"):
            clock.now += 1.5
            raise ValueError
    except ValueError:
        pass
    assert times.record()["seconds"]["dataLoad"] == 1.5
    assert times.record()["outsideLoopShare"] == 1.0


def test_the_process_has_been_running_a_little_while():
    seconds = seconds_since_process_start()
    assert seconds is None or 0.0 <= seconds < 24 * 3600


def test_the_final_eval_loss_comes_from_the_last_epochs_evaluation_only():
    history = [{"loss": 3.0, "step": 5}, {"eval_loss": 2.5, "step": 10}, {"loss": 2.0, "step": 15}, {"eval_loss": 1.9, "step": 20}]
    assert last_eval_loss(history, 20) == 1.9
    assert last_eval_loss(history, 25) is None  # not evaluated at the final step: the stage evaluates again
    assert last_eval_loss([], 1) is None
