"""One vocabulary and one default for each setting (issue 22): invdiff/config.py names them, and
the command line, the training configs and the models read them from there."""
import argparse
import dataclasses
import json
import os

import invdiff
from invdiff.cli import build_parser
from invdiff.config import (
    ATTENTION_BACKENDS,
    FROZEN_DTYPES,
    GUIDANCE_KINDS,
    LAM_MODES,
    SCHEDULER_NAMES,
    BaseTrainConfig,
    DebiasConfig,
)


def _subcommand(name):
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[name]


def _flag(parser, flag):
    return next(a for a in parser._actions if flag in a.option_strings)


def test_the_command_line_offers_the_shared_vocabulary():
    assert tuple(_flag(_subcommand("sample"), "--scheduler").choices) == SCHEDULER_NAMES
    for command in ("debias", "sample", "serve"):
        assert tuple(_flag(_subcommand(command), "--attention").choices) == ATTENTION_BACKENDS, command
    for command in ("debias", "serve"):
        assert tuple(_flag(_subcommand(command), "--frozen-dtype").choices) == FROZEN_DTYPES, command
    assert tuple(_flag(_subcommand("debias"), "--guidance").choices) == GUIDANCE_KINDS
    assert tuple(_flag(_subcommand("debias"), "--lam-mode").choices) == LAM_MODES
    defaults = DebiasConfig()
    for command in ("sample", "serve"):
        assert _flag(_subcommand(command), "--attention").default == defaults.attention
    assert _flag(_subcommand("serve"), "--frozen-dtype").default == defaults.frozen_dtype


def test_the_models_and_the_sampler_take_the_shared_vocabulary():
    from invdiff.models import sd
    from invdiff.sampling import spec

    assert sd.ATTENTION_BACKENDS is ATTENTION_BACKENDS
    assert tuple(sd.DTYPES) == FROZEN_DTYPES
    assert sorted(spec.SCHEDULERS) == sorted(SCHEDULER_NAMES)


def test_train_base_defaults_are_base_train_config():
    args = build_parser().parse_args(["train-base", "--out", "unused"])
    config = BaseTrainConfig()
    assert (args.steps, args.batch_size, args.lr, args.seed) == (config.steps, config.batch_size, config.lr, config.seed)


def test_the_shipped_bases_were_trained_at_base_train_config():
    """scripts/make_assets.py trains the shipped bases at BaseTrainConfig(); what each recorded is it."""
    assets = os.path.join(os.path.dirname(invdiff.__file__), "assets")
    expected = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(BaseTrainConfig()).items()}
    checked = 0
    for name in sorted(os.listdir(assets)):
        path = os.path.join(assets, name, "invdiff_base.json")
        if os.path.isfile(path):
            with open(path) as f:
                assert json.load(f)["train"] == expected, name
            checked += 1
    assert checked >= 1


def test_the_min_and_max_step_defaults_are_debias_config():
    from invdiff.environments import MaxStepPolicy, max_step_policy
    from invdiff.training import MinStepConfig

    debias, min_step = DebiasConfig(), MinStepConfig()
    for field in ("steps", "batch_size", "lr", "lam", "lam_warmup", "lam_mode", "seed", "objective", "ema_decay", "grad_accum"):
        assert getattr(min_step, field) == getattr(debias, field), field
    assert MaxStepPolicy() == max_step_policy(debias)
