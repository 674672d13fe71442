"""LR schedules by name, warmup/decay step values and the step arithmetic
(library/training/lr_schedulers.py). Curves are checked against their formulas with a
base learning rate of 1, so the learning rate is the schedule's multiplier."""

from __future__ import annotations

import argparse
import logging
import math

import pytest
import torch

from library.args.groups import add_optimizer_arguments
from library.errors import UserInputError
from library.training import lr_schedulers as S
from library.training.optimizers import get_optimizer


def parse(*argv: str, max_train_steps: int = 100, **extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    args = parser.parse_args(list(argv))
    args.max_train_steps = max_train_steps
    args.gradient_accumulation_steps = 1
    for key, value in extra.items():
        setattr(args, key, value)
    return args


def sgd(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def curve(scheduler, optimizer, steps: int) -> list:
    """curve[k] = learning rate after k scheduler steps."""
    values = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        optimizer.step()  # no gradients: a no-op that keeps torch's step-order check quiet
        scheduler.step()
        values.append(scheduler.get_last_lr()[0])
    return values


def lrs_for(*argv, steps=None, num_processes=1, max_train_steps=100, lr=1.0, **extra):
    args = parse(*argv, max_train_steps=max_train_steps, **extra)
    optimizer = sgd(lr)
    scheduler = S.get_scheduler(args, optimizer, num_processes)
    total = max_train_steps * num_processes
    return curve(scheduler, optimizer, total if steps is None else steps)


# ---------------------------------------------------------------- every name against its formula


def test_constant_and_its_warmup_rule():
    assert set(lrs_for("--lr_scheduler", "constant", steps=10)) == {1.0}
    with pytest.raises(UserInputError, match="constant_with_warmup"):
        lrs_for("--lr_scheduler", "constant", "--lr_warmup_steps", "5")


def test_constant_with_warmup():
    lr = lrs_for("--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "4", steps=20)
    assert lr[:5] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0]) and set(lr[4:]) == {1.0}


def test_linear_warmup_then_decay_to_zero():
    lr = lrs_for("--lr_scheduler", "linear", "--lr_warmup_steps", "10")  # T = 100
    assert lr[5] == pytest.approx(0.5) and lr[10] == pytest.approx(1.0)
    assert lr[55] == pytest.approx(0.5) and lr[100] == pytest.approx(0.0)
    for k in (20, 70, 90):
        assert lr[k] == pytest.approx((100 - k) / 90)


def test_cosine():
    lr = lrs_for("--lr_scheduler", "cosine", "--lr_warmup_steps", "10")
    for k in (10, 30, 55, 80, 100):
        assert lr[k] == pytest.approx(0.5 * (1 + math.cos(math.pi * (k - 10) / 90)), abs=1e-9)
    assert lr[55] == pytest.approx(0.5) and lr[100] == pytest.approx(0.0, abs=1e-12)


def test_cosine_with_restarts_cycles():
    lr = lrs_for("--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "2")
    assert lr[0] == pytest.approx(1.0) and lr[25] == pytest.approx(0.5)
    assert lr[49] < 0.01 and lr[50] == pytest.approx(1.0)  # hard restart
    assert lr[75] == pytest.approx(0.5) and lr[100] == 0.0


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_polynomial_power(power):
    lr = lrs_for("--lr_scheduler", "polynomial", "--lr_scheduler_power", str(power), "--lr_warmup_steps", "20")
    end = 1e-7  # transformers' default lr_end
    for k in (20, 40, 60, 99):
        assert lr[k] == pytest.approx(end + (1 - end) * (1 - (k - 20) / 80) ** power)
    assert lr[100] == pytest.approx(end)


def test_polynomial_lr_end_from_scheduler_args():
    lr = lrs_for("--lr_scheduler", "polynomial", "--lr_scheduler_args", "lr_end=0.5")
    assert lr[50] == pytest.approx(0.75) and lr[100] == pytest.approx(0.5)
    with pytest.raises(UserInputError, match="lr_end"):
        lrs_for("--lr_scheduler", "polynomial", "--lr_scheduler_args", "lr_end=2.0")


def test_inverse_sqrt_timescale():
    lr = lrs_for("--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "10")  # timescale defaults to W
    assert lr[5] == pytest.approx(0.5) and lr[10] == pytest.approx(1.0) and lr[40] == pytest.approx(0.5)
    lr = lrs_for("--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "10", "--lr_scheduler_timescale", "20")
    for k in (10, 30, 70):
        assert lr[k] == pytest.approx(1 / math.sqrt((k + 10) / 20))


def test_cosine_with_min_lr():
    lr = lrs_for("--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1")
    assert lr[0] == pytest.approx(1.0) and lr[50] == pytest.approx(0.55) and lr[100] == pytest.approx(0.1)
    # num_cycles is halved: 2 cycles of the option = one full cosine wave, back to the top at T
    lr = lrs_for(
        "--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0", "--lr_scheduler_num_cycles", "2"
    )
    assert lr[50] == pytest.approx(0.0, abs=1e-12) and lr[100] == pytest.approx(1.0)
    # the minimum may come from --lr_scheduler_args instead
    lr = lrs_for("--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_args", "min_lr=0.2")
    assert lr[100] == pytest.approx(0.2)


def test_min_lr_rules():
    with pytest.raises(UserInputError, match="--lr_scheduler_min_lr_ratio"):
        lrs_for("--lr_scheduler", "cosine_with_min_lr")
    with pytest.raises(UserInputError, match="not both"):
        lrs_for("--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1",
                "--lr_scheduler_args", "min_lr=0.2")  # fmt: skip
    with pytest.raises(UserInputError, match="between 0 and 1"):
        lrs_for("--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "1.5")


def test_cosine_warmup_with_min_lr_works():
    # The reference passes arguments this transformers function does not take; here it runs.
    lr = lrs_for(
        "--lr_scheduler", "cosine_warmup_with_min_lr", "--lr_warmup_steps", "10", "--lr_scheduler_min_lr_ratio", "0.1"
    )
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)  # (k+1)/W during warmup
    progress = (55 - 10 + 1) / 90
    assert lr[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    # this transformers curve runs one step ahead: it reaches the minimum at T-1, the last step trained
    assert lr[99] == pytest.approx(0.1)


def test_warmup_stable_decay():
    lr = lrs_for(
        "--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "10", "--lr_decay_steps", "20",
        "--lr_scheduler_min_lr_ratio", "0.1",
    )  # fmt: skip  # W=10, S=70, D=20
    assert lr[0] == pytest.approx(0.1) and lr[5] == pytest.approx(0.1 + 0.9 * 0.5)
    assert set(lr[10:81]) == {1.0}
    assert lr[90] == pytest.approx(0.1 + 0.9 * 0.5) and lr[100] == pytest.approx(0.1)
    lr = lrs_for("--lr_scheduler", "warmup_stable_decay", "--lr_decay_steps", "0.5")  # ratio, min ratio 0
    assert lr[50] == pytest.approx(1.0) and lr[75] == pytest.approx(0.5) and lr[100] == 0.0
    with pytest.raises(UserInputError, match="exceed"):
        lrs_for("--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "60", "--lr_decay_steps", "50")


def test_warmup_stable_decay_without_decay_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="library.training.lr_schedulers"):
        lr = lrs_for("--lr_scheduler", "warmup_stable_decay", steps=100)
    assert "never decays" in caplog.text and lr[99] == 1.0


def test_piecewise_constant():
    lr = lrs_for("--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules='1:10,0.1:20,0.01'")
    assert lr[9] == 1.0 and lr[10] == pytest.approx(0.1) and lr[19] == pytest.approx(0.1) and lr[20] == 0.01
    # boundaries count optimizer steps: with 2 processes stepping the scheduler they double
    lr = lrs_for(
        "--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules='1:10,0.1'", num_processes=2
    )
    assert lr[19] == 1.0 and lr[20] == pytest.approx(0.1)
    with pytest.raises(UserInputError, match="step_rules"):
        lrs_for("--lr_scheduler", "piecewise_constant")
    with pytest.raises(UserInputError, match="malformed"):
        lrs_for("--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules='1:x,0.1'")


def test_reduce_lr_on_plateau_is_fed_with_the_loss():
    args = parse("--lr_scheduler", "reduce_lr_on_plateau", "--lr_scheduler_args", "interval=2", "patience=1",
                 "factor=0.5")  # fmt: skip
    optimizer = sgd()
    scheduler = S.get_scheduler(args, optimizer, 1)
    assert isinstance(scheduler, S.LossPlateauScheduler) and scheduler.interval == 2

    class Wrapped:  # accelerate's AcceleratedScheduler keeps the real one in .scheduler
        def __init__(self, inner):
            self.scheduler = inner

    lrs = []
    for step in range(12):
        S.report_loss(Wrapped(scheduler), torch.tensor(1.0 if step < 4 else 2.0))  # loss stops improving
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    # checks at calls 2,4,...: mean loss 1 (best), 1 (no gain, 1 bad), 2 (2 bad > patience -> halve), ...
    assert lrs[:5] == [1.0] * 5 and lrs[5] == 0.5 and lrs[-1] < 0.5
    state = scheduler.state_dict()
    restored = S.get_scheduler(args, sgd(), 1)
    restored.load_state_dict(state)
    assert restored.calls == 12 and restored.best == 1.0
    with pytest.raises(UserInputError, match="no warmup"):
        S.get_scheduler(parse("--lr_scheduler", "reduce_lr_on_plateau", "--lr_warmup_steps", "5"), sgd(), 1)


def test_reduce_lr_on_plateau_default_interval_and_missing_losses(caplog):
    scheduler = S.get_scheduler(parse("--lr_scheduler", "reduce_lr_on_plateau", max_train_steps=1000), sgd(), 2)
    assert scheduler.interval == 10 * 2  # 1% of the run, in scheduler steps
    with caplog.at_level(logging.WARNING, logger="library.training.lr_schedulers"):
        for _ in range(40):
            scheduler.step()
    assert caplog.text.count("no loss values") == 1
    S.report_loss(object(), 1.0)  # other schedulers: ignored


def test_adafactor_schedule():
    model = torch.nn.Linear(3, 2)
    args = parse("--optimizer_type", "Adafactor", "--learning_rate", "1e-3", "--lr_scheduler", "cosine")
    _, _, optimizer = get_optimizer(args, model.parameters())
    assert args.lr_scheduler == "adafactor:0.001"
    scheduler = S.get_scheduler(args, optimizer, 1)
    assert type(scheduler).__name__ == "AdafactorSchedule"
    assert S.current_learning_rates(scheduler, optimizer) == [pytest.approx(1e-3)]
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    computed = S.current_learning_rates(scheduler, optimizer)[0]
    assert 0 < computed < 1e-1 and computed != pytest.approx(1e-3)
    # bare "adafactor" starts from --learning_rate
    args.lr_scheduler = "adafactor"
    _, _, fresh = get_optimizer(args, torch.nn.Linear(3, 2).parameters())
    assert S.current_learning_rates(S.get_scheduler(args, fresh, 1), fresh) == [pytest.approx(1e-3)]
    with pytest.raises(UserInputError, match="only works with --optimizer_type Adafactor"):
        S.get_scheduler(parse("--lr_scheduler", "adafactor:1e-3"), sgd(), 1)


def test_unknown_name_lists_valid_ones_and_names_are_case_insensitive():
    with pytest.raises(UserInputError) as info:
        lrs_for("--lr_scheduler", "cosine_annealing")
    message = str(info.value)
    for name in ("constant_with_warmup", "cosine_with_restarts", "warmup_stable_decay", "piecewise_constant"):
        assert name in message
    assert lrs_for("--lr_scheduler", "Cosine")[50] == pytest.approx(0.5)


def test_scheduler_args_errors():
    with pytest.raises(UserInputError, match="--lr_scheduler_args"):
        lrs_for("--lr_scheduler", "linear", "--lr_scheduler_args", "power")
    with pytest.raises(UserInputError, match="rejected its settings"):
        lrs_for("--lr_scheduler", "linear", "--lr_scheduler_args", "foo=1")


# ---------------------------------------------------------------- warmup / decay values


def test_warmup_ratio_and_percent_equal_int_of_ratio_times_total():
    # T = 55: int(0.1 * 55) = 5 warmup steps
    for value in ("0.1", "10%"):
        lr = lrs_for("--lr_scheduler", "linear", "--lr_warmup_steps", value, max_train_steps=55)
        assert lr[4] == pytest.approx(0.8) and lr[5] == pytest.approx(1.0)
    # values from a TOML file skip argparse: a float stays a ratio, "10%" is still understood
    for value in (0.1, "10%"):
        assert S.scheduler_steps(value, "--lr_warmup_steps", 55) == 5
    assert S.scheduler_steps(20, "--lr_warmup_steps", 55) == 20
    assert S.scheduler_steps(20.0, "--lr_warmup_steps", 55) == 20
    assert S.scheduler_steps(None, "--lr_warmup_steps", 55) == 0
    for bad in (1.5, -3, "abc", True, float("nan")):
        with pytest.raises(UserInputError, match="--lr_warmup_steps"):
            S.scheduler_steps(bad, "--lr_warmup_steps", 55)


def test_multi_process_counts_are_optimizer_steps():
    # 2 processes step the scheduler twice per optimizer step: T = 200 scheduler steps
    assert S.scheduler_steps(10, "--lr_warmup_steps", 100, 2) == 20
    assert S.scheduler_steps(0.1, "--lr_warmup_steps", 100, 2) == 20
    lr = lrs_for("--lr_scheduler", "linear", "--lr_warmup_steps", "10", num_processes=2)
    assert lr[20] == pytest.approx(1.0) and lr[110] == pytest.approx(0.5) and lr[200] == 0.0


def test_decay_steps_warn_when_unused(caplog):
    with caplog.at_level(logging.WARNING, logger="library.training.lr_schedulers"):
        lrs_for("--lr_scheduler", "cosine", "--lr_decay_steps", "10", steps=1)
    assert "only used by warmup_stable_decay" in caplog.text


# ---------------------------------------------------------------- custom class, schedule-free


def test_lr_scheduler_type():
    args = parse("--lr_scheduler_type", "CosineAnnealingLR", "--lr_scheduler_args", "T_max=10", "eta_min=0.5")
    optimizer = sgd()
    scheduler = S.get_scheduler(args, optimizer, 1)
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert curve(scheduler, optimizer, 10)[10] == pytest.approx(0.5)
    args = parse("--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler_args", "step_size=3",
                 "gamma=0.5")  # fmt: skip
    optimizer = sgd()
    lr = curve(S.get_scheduler(args, optimizer, 1), optimizer, 6)
    assert lr[2] == 1.0 and lr[3] == 0.5 and lr[6] == 0.25
    with pytest.raises(UserInputError, match="--lr_warmup_steps"):
        S.get_scheduler(parse("--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=3",
                              "--lr_warmup_steps", "0.1"), sgd(), 1)  # fmt: skip
    with pytest.raises(UserInputError, match="torch.optim.lr_scheduler"):
        S.get_scheduler(parse("--lr_scheduler_type", "NoSuchLR"), sgd(), 1)
    with pytest.raises(UserInputError, match="cannot import"):
        S.get_scheduler(parse("--lr_scheduler_type", "no_such_pkg.Sched"), sgd(), 1)
    with pytest.raises(UserInputError, match="rejected"):
        S.get_scheduler(parse("--lr_scheduler_type", "StepLR"), sgd(), 1)  # step_size missing
    # torch's ReduceLROnPlateau is given the loss feed too
    plateau = S.get_scheduler(parse("--lr_scheduler_type", "ReduceLROnPlateau"), sgd(), 1)
    assert isinstance(plateau, S.LossPlateauScheduler)


def test_schedule_free_gets_a_no_op_scheduler(caplog):
    model = torch.nn.Linear(3, 2)
    args = parse("--optimizer_type", "AdamWScheduleFree", "--learning_rate", "0.01", "--lr_scheduler", "cosine",
                 "--lr_warmup_steps", "10")  # fmt: skip
    _, _, optimizer = get_optimizer(args, model.parameters())
    with caplog.at_level(logging.WARNING, logger="library.training.lr_schedulers"):
        scheduler = S.get_scheduler(args, optimizer, 1)
    assert isinstance(scheduler, S.NoOpScheduler) and "ignored" in caplog.text
    assert set(curve(scheduler, optimizer, 5)) == {0.01}
    assert S.current_learning_rates(scheduler, optimizer) == [pytest.approx(0.01)]
    scheduler.load_state_dict(scheduler.state_dict())


# ---------------------------------------------------------------- current_learning_rates


def test_current_learning_rates():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW([{"params": a.parameters(), "lr": 1e-3}, {"params": b.parameters(), "lr": 1e-4}])
    scheduler = S.get_scheduler(parse("--lr_scheduler", "linear", "--lr_warmup_steps", "10"), optimizer, 1)
    curve(scheduler, optimizer, 5)
    assert S.current_learning_rates(scheduler, optimizer) == [pytest.approx(5e-4), pytest.approx(5e-5)]

    class Wrapped:
        def __init__(self, inner, attr):
            setattr(self, attr, inner)

    assert S.current_learning_rates(Wrapped(scheduler, "scheduler"), Wrapped(optimizer, "optimizer")) == [
        pytest.approx(5e-4),
        pytest.approx(5e-5),
    ]


def test_current_learning_rates_multiplies_adapted_step_size():
    model = torch.nn.Linear(3, 2)
    _, _, optimizer = get_optimizer(parse("--optimizer_type", "Prodigy", "--learning_rate", "1.0"), model.parameters())
    scheduler = S.get_scheduler(parse(), optimizer, 1)
    for _ in range(3):
        model(torch.randn(4, 3)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    d = optimizer.param_groups[0]["d"]
    assert d != 1.0
    assert S.current_learning_rates(scheduler, optimizer) == [pytest.approx(1.0 * d)]


# ---------------------------------------------------------------- resume


def test_scheduler_state_round_trip():
    args = parse("--lr_scheduler", "cosine_with_restarts", "--lr_warmup_steps", "5", "--lr_scheduler_num_cycles", "3")
    optimizer = sgd()
    scheduler = S.get_scheduler(args, optimizer, 1)
    full = curve(scheduler, optimizer, 60)
    optimizer = sgd()
    first = S.get_scheduler(args, optimizer, 1)
    curve(first, optimizer, 30)
    optimizer2 = sgd()
    resumed = S.get_scheduler(args, optimizer2, 1)
    resumed.load_state_dict(first.state_dict())
    optimizer2.param_groups[0]["lr"] = optimizer.param_groups[0]["lr"]
    assert curve(resumed, optimizer2, 30) == pytest.approx(full[30:])


# ---------------------------------------------------------------- step arithmetic


def test_compute_max_train_steps():
    args = argparse.Namespace(max_train_steps=1600, max_train_epochs=None, gradient_accumulation_steps=1)
    assert S.compute_max_train_steps(args, num_batches=10, num_processes=2) == 1600
    args = argparse.Namespace(max_train_steps=1600, max_train_epochs=3, gradient_accumulation_steps=2)
    assert S.compute_max_train_steps(args, num_batches=10, num_processes=2) == 3 * math.ceil(10 / 2 / 2)
    assert S.compute_max_train_steps(args, num_batches=9, num_processes=1) == 3 * math.ceil(9 / 1 / 2)
    with pytest.raises(UserInputError, match="--max_train_steps"):
        S.compute_max_train_steps(argparse.Namespace(max_train_steps=0, max_train_epochs=None), 10)


def test_num_train_epochs_and_update_steps():
    assert S.update_steps_per_epoch(10, 2, 2) == 3
    assert S.num_train_epochs(100, 10) == 10
    assert S.num_train_epochs(101, 10) == 11
    # 2 processes: each sees ceil(10/2)=5 batches -> ceil(5/2)=3 updates per epoch
    assert S.num_train_epochs(95, 10, num_processes=2, gradient_accumulation_steps=2) == math.ceil(95 / 3)
    assert S.num_train_epochs(95, 5, num_processes=1, gradient_accumulation_steps=2) == math.ceil(95 / 3)


def test_save_every_n_epochs_from_ratio():
    assert S.save_every_n_epochs_from_ratio(10, 3) == 3
    assert S.save_every_n_epochs_from_ratio(10, 4) == 2
    assert S.save_every_n_epochs_from_ratio(2, 5) == 1  # never below 1
    assert S.save_every_n_epochs_from_ratio(10, None) is None
    with pytest.raises(UserInputError):
        S.save_every_n_epochs_from_ratio(10, -1)
