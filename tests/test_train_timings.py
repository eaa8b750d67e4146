"""Where the train stage's wall time goes: the phase record written into final/training.json."""

from __future__ import annotations

import json

from tweetbot_trainer.timing import PhaseTimes, seconds_since_process_start
from tweetbot_trainer.train import last_eval_loss


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


def test_trainer_train_splits_into_engine_set_up_the_phases_timed_inside_and_the_loop():
    clock = FakeClock()
    times = PhaseTimes(clock=clock)
    ready = []
    with times.training(engine_ready=lambda: ready[0] if ready else None):
        clock.now += 2.0
        ready.append(clock.now)  # on_train_begin
        clock.now += 5.0
        with times.phase("eval"):
            clock.now += 1.0
        clock.now += 3.0
    assert times.seconds == {"engineInit": 2.0, "eval": 1.0, "trainingSteps": 8.0}


def test_a_checkpoint_save_is_timed_from_the_step_end_less_the_evaluation_before_it():
    from transformers import TrainerControl, TrainerState

    from tweetbot_trainer.hooks import TrainTimes

    clock = FakeClock()
    times = PhaseTimes(clock=clock)
    hooks, state, control = TrainTimes(times), TrainerState(), TrainerControl()
    hooks.on_train_begin(None, state, control)
    assert hooks.engine_ready == 100.0
    clock.now += 4.0  # a step
    hooks.on_step_end(None, state, control)
    clock.now += 0.5  # the loss gathered for logging: the loop's
    hooks.on_log(None, state, control, logs={})
    with times.phase("eval"):
        clock.now += 2.0
    clock.now += 1.5  # the save
    hooks.on_save(None, state, control)
    clock.now += 1.0
    hooks.on_step_end(None, state, control)
    clock.now += 0.25  # a save right after a step
    hooks.on_save(None, state, control)
    assert times.seconds == {"eval": 2.0, "checkpointSave": 1.75}
