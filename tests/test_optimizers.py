"""--optimizer_type resolution, --optimizer_args parsing and optimizer special rules
(library/training/optimizers.py)."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

import pytest
import torch

from library.args.groups import add_optimizer_arguments
from library.errors import UserInputError
from library.training import optimizers as O


def parse(*argv: str, **extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    args = parser.parse_args(list(argv))
    args.gradient_accumulation_steps = 1
    args.max_train_steps = 10
    for key, value in extra.items():
        setattr(args, key, value)
    return args


def one_step(optimizer: torch.optim.Optimizer, model: torch.nn.Module, steps: int = 1) -> None:
    torch.manual_seed(0)
    for _ in range(steps):
        loss = model(torch.randn(4, model.in_features)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


# name -> (module.Class used, learning rate to use)
EXPECTED = {
    "AdamW": ("torch.optim.adamw.AdamW", 1e-3),
    "AdamW8bit": ("bitsandbytes.optim.adamw.AdamW8bit", 1e-3),
    "SGDNesterov8bit": ("bitsandbytes.optim.sgd.SGD8bit", 1e-2),
    "Lion8bit": ("bitsandbytes.optim.lion.Lion8bit", 1e-3),
    "PagedAdamW8bit": ("bitsandbytes.optim.adamw.PagedAdamW8bit", 1e-3),
    "PagedLion8bit": ("bitsandbytes.optim.lion.PagedLion8bit", 1e-3),
    "PagedAdamW": ("bitsandbytes.optim.adamw.PagedAdamW", 1e-3),
    "PagedAdamW32bit": ("bitsandbytes.optim.adamw.PagedAdamW32bit", 1e-3),
    "SGDNesterov": ("torch.optim.sgd.SGD", 1e-2),
    "Lion": ("lion_pytorch.lion_pytorch.Lion", 1e-3),
    "DAdaptation": ("dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint", 1.0),
    "DAdaptAdamPreprint": ("dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint", 1.0),
    "DAdaptAdaGrad": ("dadaptation.dadapt_adagrad.DAdaptAdaGrad", 1.0),
    "DAdaptAdam": ("dadaptation.dadapt_adam.DAdaptAdam", 1.0),
    "DAdaptAdan": ("dadaptation.dadapt_adan.DAdaptAdan", 1.0),
    "DAdaptAdanIP": ("dadaptation.experimental.dadapt_adan_ip.DAdaptAdanIP", 1.0),
    "DAdaptLion": ("dadaptation.dadapt_lion.DAdaptLion", 1.0),
    "DAdaptSGD": ("dadaptation.dadapt_sgd.DAdaptSGD", 1.0),
    "Prodigy": ("prodigyopt.prodigy.Prodigy", 1.0),
    "Adafactor": ("transformers.optimization.Adafactor", 1e-3),
    "RAdamScheduleFree": ("schedulefree.radam_schedulefree.RAdamScheduleFree", 1e-3),
    "AdamWScheduleFree": ("schedulefree.adamw_schedulefree.AdamWScheduleFree", 1e-3),
    "SGDScheduleFree": ("schedulefree.sgd_schedulefree.SGDScheduleFree", 1e-2),
}


def test_expected_covers_the_table():
    assert set(EXPECTED) == {row.name for row in O.BUILTIN_OPTIMIZERS.values()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_named_optimizer_builds_and_steps(name):
    class_path, lr = EXPECTED[name]
    torch.manual_seed(0)
    # 128x64 = 8192 weights: above bitsandbytes' 4096-element threshold, so the 8-bit
    # optimizers really keep 8-bit state.
    model = torch.nn.Linear(128, 64)
    before = model.weight.detach().clone()
    args = parse("--optimizer_type", name, "--learning_rate", str(lr))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: paged optimizers fall back on CPU
        used, _, optimizer = O.get_optimizer(args, model.parameters())
        # RAdamScheduleFree leaves the weights alone for its first steps (rectification)
        one_step(optimizer, model, steps=6)
    assert used == class_path
    assert type(optimizer).__module__ + "." + type(optimizer).__name__ == class_path
    assert not torch.equal(before, model.weight.detach())
    assert torch.isfinite(model.weight).all()


def test_names_are_case_insensitive_and_empty_means_adamw():
    model = torch.nn.Linear(3, 2)
    assert O.get_optimizer(parse("--optimizer_type", "adamw8BIT"), model.parameters())[0].endswith("AdamW8bit")
    assert O.get_optimizer(parse(), model.parameters())[0] == "torch.optim.adamw.AdamW"
    assert O.get_optimizer(parse("--optimizer_type", "PRODIGY"), model.parameters())[0] == "prodigyopt.prodigy.Prodigy"


def test_sgd_nesterov_defaults_and_overrides():
    model = torch.nn.Linear(3, 2)
    _, args_str, opt = O.get_optimizer(parse("--optimizer_type", "SGDNesterov"), model.parameters())
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["nesterov"] is True
    assert "momentum=0.9" in args_str
    _, _, opt = O.get_optimizer(
        parse("--optimizer_type", "SGDNesterov8bit", "--optimizer_args", "momentum=0.5"), model.parameters()
    )
    # bitsandbytes keeps momentum as betas[0] (and accepts, but does not apply, nesterov)
    assert opt.param_groups[0]["betas"][0] == 0.5
    with pytest.raises(UserInputError, match="nesterov"):
        O.get_optimizer(parse("--optimizer_type", "SGDNesterov", "--optimizer_args", "nesterov=False"), model.parameters())


# ---------------------------------------------------------------- generic resolver


def test_generic_resolver_torch_names_and_module_paths():
    model = torch.nn.Linear(3, 2)
    for spelling in ("RMSprop", "rmsprop", "torch.optim.RMSprop"):
        name, _, opt = O.get_optimizer(parse("--optimizer_type", spelling), model.parameters())
        assert isinstance(opt, torch.optim.RMSprop) and name == "torch.optim.rmsprop.RMSprop"
    name, args_str, opt = O.get_optimizer(
        parse("--optimizer_type", "bitsandbytes.optim.AdEMAMix8bit", "--optimizer_args", "weight_decay=0.01"),
        model.parameters(),
    )
    assert name == "bitsandbytes.optim.ademamix.AdEMAMix8bit" and args_str == "weight_decay=0.01"
    one_step(opt, model)


def test_module_path_to_adafactor_gets_the_adafactor_rules():
    args = parse("--optimizer_type", "transformers.optimization.Adafactor", "--learning_rate", "1e-3")
    _, _, opt = O.get_optimizer(args, torch.nn.Linear(3, 2).parameters())
    assert opt.param_groups[0]["lr"] is None and args.lr_scheduler == "adafactor:0.001"


def test_unknown_names_explain_what_is_accepted():
    params = torch.nn.Linear(3, 2).parameters
    with pytest.raises(UserInputError) as info:
        O.get_optimizer(parse("--optimizer_type", "NoSuchOpt"), params())
    message = str(info.value)
    assert "NoSuchOpt" in message and "AdamW8bit" in message and "Prodigy" in message
    assert "module.Class" in message and "\n" not in message
    with pytest.raises(UserInputError, match="bitsandbytes.optim.AdEMAMix8bit"):
        O.get_optimizer(parse("--optimizer_type", "AdEMAMix8bit"), params())  # hint at the full path
    with pytest.raises(UserInputError, match="Did you mean Prodigy"):
        O.get_optimizer(parse("--optimizer_type", "Prodigi"), params())
    with pytest.raises(UserInputError, match="DAdaptAdam"):
        O.get_optimizer(parse("--optimizer_type", "DAdaptFoo"), params())
    with pytest.raises(UserInputError, match="cannot import module 'no_such_pkg'"):
        O.get_optimizer(parse("--optimizer_type", "no_such_pkg.Opt"), params())
    with pytest.raises(UserInputError, match="has no attribute 'Nope'"):
        O.get_optimizer(parse("--optimizer_type", "torch.optim.Nope"), params())
    with pytest.raises(UserInputError, match="not a known optimizer"):
        O.get_optimizer(parse("--optimizer_type", "Optimizer"), params())  # the base class is no optimizer


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dadaptation", None)  # makes `import dadaptation` fail
    with pytest.raises(UserInputError, match="pip install dadaptation"):
        O.get_optimizer(parse("--optimizer_type", "DAdaptAdam"), torch.nn.Linear(3, 2).parameters())


def test_constructor_rejections_become_user_errors():
    with pytest.raises(UserInputError, match="foo"):
        O.get_optimizer(parse("--optimizer_args", "foo=1"), torch.nn.Linear(3, 2).parameters())
    with pytest.raises(UserInputError, match="--learning_rate"):
        O.get_optimizer(parse("--optimizer_args", "lr=1e-3"), torch.nn.Linear(3, 2).parameters())


# ---------------------------------------------------------------- --optimizer_args


def test_optimizer_args_literals():
    parsed = O.parse_key_value_args(
        ["betas=0.9,0.99", "weight_decay=0.01", "mode='cosine'", 'name="x y"', "flag=True", "eps=None", "n=3"],
        "--optimizer_args",
    )
    assert parsed == {
        "betas": (0.9, 0.99),
        "weight_decay": 0.01,
        "mode": "cosine",
        "name": "x y",
        "flag": True,
        "eps": None,
        "n": 3,
    }
    assert O.parse_key_value_args(None, "--x") == {} and O.parse_key_value_args([], "--x") == {}
    # a TOML file may hold one string
    assert O.parse_key_value_args("weight_decay=0.1 betas=0.9,0.99", "--x") == {
        "weight_decay": 0.1,
        "betas": (0.9, 0.99),
    }


@pytest.mark.parametrize(
    "item, fragment",
    [
        ("weight_decay", "not key=value"),
        ("=0.1", "not key=value"),
        ("decouple=", "no value"),
        ("mode=cosine", "strings need quotes"),
        ("betas=(0.9,", "not a Python literal"),
    ],
)
def test_optimizer_args_errors_name_the_item(item, fragment):
    with pytest.raises(UserInputError) as info:
        O.parse_key_value_args([item], "--optimizer_args")
    assert fragment in str(info.value) and "--optimizer_args" in str(info.value)
    assert repr(item) in str(info.value) or item in str(info.value)


def test_duplicate_keys_are_rejected():
    with pytest.raises(UserInputError, match="more than once"):
        O.parse_key_value_args(["a=1", "a=2"], "--optimizer_args")


def test_optimizer_args_reach_the_constructor_and_the_metadata():
    model = torch.nn.Linear(3, 2)
    args = parse("--optimizer_type", "AdamW", "--optimizer_args", "weight_decay=0.1", "betas=0.8,0.9")
    name, args_str, opt = O.get_optimizer(args, model.parameters())
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert O.optimizer_metadata_string(name, args_str) == "torch.optim.adamw.AdamW(weight_decay=0.1,betas=(0.8, 0.9))"
    name, args_str, _ = O.get_optimizer(parse("--optimizer_args", "weight_decay=0.1"), model.parameters())
    assert O.optimizer_metadata_string(name, args_str) == "torch.optim.adamw.AdamW(weight_decay=0.1)"
    name, args_str, _ = O.get_optimizer(parse(), model.parameters())
    assert args_str == "" and O.optimizer_metadata_string(name, args_str) == "torch.optim.adamw.AdamW"


def test_param_groups_and_generators():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    groups = [{"params": list(a.parameters()), "lr": 1e-3}, {"params": list(b.parameters()), "lr": 5e-4}]
    _, _, opt = O.get_optimizer(parse("--learning_rate", "1e-2"), groups)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-4]
    _, _, opt = O.get_optimizer(parse("--learning_rate", "1e-2"), (p for p in a.parameters()))
    assert opt.param_groups[0]["lr"] == 1e-2


# ---------------------------------------------------------------- legacy flags, fused backward


def test_legacy_flags():
    model = torch.nn.Linear(3, 2)
    assert O.get_optimizer(parse("--use_8bit_adam"), model.parameters())[0].endswith(".AdamW8bit")
    assert O.get_optimizer(parse("--use_lion_optimizer"), model.parameters())[0] == "lion_pytorch.lion_pytorch.Lion"
    with pytest.raises(UserInputError, match="--use_8bit_adam cannot be combined"):
        O.get_optimizer(parse("--use_8bit_adam", "--optimizer_type", "Lion"), model.parameters())
    with pytest.raises(UserInputError, match="together"):
        O.get_optimizer(parse("--use_8bit_adam", "--use_lion_optimizer"), model.parameters())


def test_fused_backward_pass_rules():
    O.check_fused_backward_pass(parse("--fused_backward_pass", "--optimizer_type", "adafactor"))
    O.check_fused_backward_pass(parse("--optimizer_type", "AdamW"))  # flag off: nothing to check
    with pytest.raises(UserInputError, match="needs --optimizer_type Adafactor"):
        O.check_fused_backward_pass(parse("--fused_backward_pass", "--optimizer_type", "AdamW"))
    with pytest.raises(UserInputError, match="gradient_accumulation_steps 4"):
        O.check_fused_backward_pass(
            parse("--fused_backward_pass", "--optimizer_type", "Adafactor", gradient_accumulation_steps=4)
        )
    with pytest.raises(UserInputError, match="fused_backward_pass"):
        O.get_optimizer(parse("--fused_backward_pass"), torch.nn.Linear(3, 2).parameters())


# ---------------------------------------------------------------- Adafactor


def test_adafactor_relative_step_default_drops_lrs_and_rewrites_scheduler(caplog):
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    groups = [{"params": list(a.parameters()), "lr": 1e-3}, {"params": list(b.parameters()), "lr": 5e-4}]
    args = parse("--optimizer_type", "Adafactor", "--learning_rate", "2e-4", "--lr_scheduler", "cosine")
    with caplog.at_level(logging.INFO, logger="library.training.optimizers"):
        _, args_str, opt = O.get_optimizer(args, groups)
    assert all(g["lr"] is None for g in opt.param_groups)
    assert groups[0]["lr"] == 1e-3  # the caller's dicts are left alone
    assert args.lr_scheduler == "adafactor:0.0002"
    assert "relative_step=True" in args_str
    assert "replaced by adafactor:0.0002" in caplog.text and "per-group learning rates" in caplog.text


def test_adafactor_without_relative_step_keeps_lr_and_scheduler():
    args = parse(
        "--optimizer_type", "Adafactor", "--learning_rate", "1e-3", "--lr_scheduler", "cosine",
        "--optimizer_args", "relative_step=False", "scale_parameter=False",
    )  # fmt: skip
    _, _, opt = O.get_optimizer(args, torch.nn.Linear(3, 2).parameters())
    assert opt.param_groups[0]["lr"] == 1e-3 and args.lr_scheduler == "cosine"


def test_adafactor_warmup_init_forces_relative_step():
    args = parse(
        "--optimizer_type", "Adafactor", "--learning_rate", "1e-3",
        "--optimizer_args", "relative_step=False", "warmup_init=True",
    )  # fmt: skip
    _, args_str, opt = O.get_optimizer(args, torch.nn.Linear(3, 2).parameters())
    assert opt.param_groups[0]["relative_step"] is True and opt.param_groups[0]["lr"] is None
    assert "relative_step=True" in args_str and args.lr_scheduler == "adafactor:0.001"


# ---------------------------------------------------------------- D-Adaptation / Prodigy warnings


def test_adaptive_optimizers_warn_about_small_or_mixed_lrs(caplog):
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    with caplog.at_level(logging.WARNING, logger="library.training.optimizers"):
        O.get_optimizer(parse("--optimizer_type", "Prodigy", "--learning_rate", "1e-4"), a.parameters())
    assert "usually 1.0" in caplog.text
    caplog.clear()
    groups = [{"params": list(a.parameters()), "lr": 1.0}, {"params": list(b.parameters()), "lr": 0.5}]
    with caplog.at_level(logging.WARNING, logger="library.training.optimizers"):
        O.get_optimizer(parse("--optimizer_type", "DAdaptAdam", "--learning_rate", "1.0"), groups)
    assert "different learning rates" in caplog.text and "usually 1.0" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="library.training.optimizers"):
        O.get_optimizer(parse("--optimizer_type", "DAdaptAdam", "--learning_rate", "1.0"), a.parameters())
    assert caplog.text == ""


# ---------------------------------------------------------------- schedule-free


def test_is_schedule_free():
    assert O.is_schedule_free("AdamWScheduleFree") and O.is_schedule_free("prodigyplus.ProdigyPlusScheduleFree")
    assert not O.is_schedule_free("AdamW") and not O.is_schedule_free(None)
    model = torch.nn.Linear(3, 2)
    assert not O.is_schedule_free(torch.optim.AdamW(model.parameters()))
    import schedulefree

    opt = schedulefree.SGDScheduleFree(model.parameters(), lr=0.1)
    assert O.is_schedule_free(opt) and O.is_schedule_free(type(opt))

    class Wrapper:  # what accelerate's AcceleratedOptimizer looks like from here
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert O.is_schedule_free(Wrapper(opt))
    assert O.unwrap_optimizer(Wrapper(opt)) is opt


def test_schedule_free_train_eval_switching():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    _, _, opt = O.get_optimizer(
        parse("--optimizer_type", "adamwschedulefree", "--learning_rate", "0.1"), model.parameters()
    )
    assert opt.param_groups[0]["train_mode"] is True  # returned ready to step
    for _ in range(3):
        one_step(opt, model)
    train_weights = model.weight.detach().clone()
    assert O.optimizer_eval_mode(opt) is True
    assert opt.param_groups[0]["train_mode"] is False
    eval_weights = model.weight.detach().clone()
    assert not torch.equal(train_weights, eval_weights)  # eval uses the averaged weights
    assert O.optimizer_train_mode(opt) is True
    assert torch.allclose(model.weight, train_weights, atol=1e-6)
    with O.optimizer_eval_context(opt):
        assert opt.param_groups[0]["train_mode"] is False
    assert opt.param_groups[0]["train_mode"] is True
    one_step(opt, model)  # still steppable after the round trip


def test_train_eval_helpers_are_noops_for_ordinary_optimizers():
    opt = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    assert O.optimizer_eval_mode(opt) is False and O.optimizer_train_mode(opt) is False
    assert O.optimizer_eval_mode(None) is False
    with O.optimizer_eval_context(opt):
        pass


# ---------------------------------------------------------------- early check, one-module access


def test_early_check_before_models_load():
    assert O.check_optimizer_args(parse("--optimizer_type", "Prodigy")).__name__ == "Prodigy"
    assert O.resolve_optimizer_class(parse("--optimizer_type", "RMSprop")) is torch.optim.RMSprop  # namespace form
    bad = [
        (parse("--optimizer_type", "NoSuchOpt"), "not a known optimizer"),
        (parse("--optimizer_args", "mode=x"), "--optimizer_args"),
        (parse("--optimizer_args", "lr=1"), "--learning_rate"),
        (parse("--lr_scheduler", "cosine_annealing"), "not a known schedule"),
        (parse("--lr_scheduler_args", "oops"), "--lr_scheduler_args"),
        (parse("--lr_warmup_steps", "10"), "constant_with_warmup"),
        (parse("--lr_scheduler_type", "StepLR", "--lr_warmup_steps", "10%"), "--lr_warmup_steps"),
        (parse("--lr_scheduler_type", "NoSuchLR"), "torch.optim.lr_scheduler"),
        (parse("--fused_backward_pass"), "Adafactor"),
    ]
    for args, fragment in bad:
        with pytest.raises(UserInputError, match=fragment):
            O.check_optimizer_args(args)
    # Adafactor (relative_step) and schedule-free optimizers bring their own schedule: a warmup with
    # the default constant schedule is not an error for them
    O.check_optimizer_args(parse("--optimizer_type", "Adafactor", "--lr_warmup_steps", "10"))
    O.check_optimizer_args(parse("--optimizer_type", "AdamWScheduleFree", "--lr_warmup_steps", "10"))
    with pytest.raises(UserInputError, match="constant_with_warmup"):
        O.check_optimizer_args(
            parse("--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "--lr_warmup_steps", "10")
        )


def test_schedule_helpers_are_reachable_from_this_module():
    from library.training import lr_schedulers

    for name in ("get_scheduler", "current_learning_rates", "report_loss", "compute_max_train_steps"):
        assert getattr(O, name) is getattr(lr_schedulers, name)
    with pytest.raises(AttributeError):
        O.no_such_helper  # noqa: B018
