"""A setting of `sophia train` is one TrainConfig field: its option, help, choices, resume rule and users come from
the field's metadata, and `to_argv` writes any settings back as `sophia train` options."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

import pytest

from sophia.cli.train import add_arguments, given_settings
from sophia.lm.config import (
    RESUME_CHANGEABLE,
    SCHEDULE_CHANGES,
    USED_BY,
    TrainConfig,
    TrainError,
    resume_config,
    to_argv,
    unused_settings,
)

FIELDS = fields(TrainConfig)


def _parse(argv: list[str]) -> dict:
    """The settings `sophia train ARGV` gives (None: not given), read by the command's own parser."""
    parser = argparse.ArgumentParser(prog="sophia train")
    add_arguments(parser)
    return given_settings(parser.parse_args(argv))


def _other_value(f, flip_bool: bool = True):
    """A value of field ``f``'s type other than its default, picked per type: a flipped flag, an int and a float
    with no short decimal form (so that only an exact round trip passes), a choice other than the default, or a
    string with a space in it."""
    default = f.default
    kind = f.type.split(" | ")[0]
    if kind == "bool":
        return (not default if default is not None else True) if flip_bool else False
    if kind == "int":
        return (default or 0) + 7
    if kind == "float":
        return (default or 0.0) + 1 / 3
    choices = f.metadata["choices"]
    if choices:
        return next(c for c in choices if c != default)
    return f"{default} and more/{f.name}"


def _round_trip(values: dict) -> dict:
    """argv -> parsed settings -> argv -> parsed settings: the same settings and the same argv both times."""
    argv = to_argv(values)
    parsed = _parse(argv)
    again = to_argv(parsed)
    assert again == argv
    assert _parse(again) == parsed
    assert TrainConfig(**{k: v for k, v in _parse(again).items() if v is not None}) == TrainConfig(
        **{k: v for k, v in parsed.items() if v is not None})
    return parsed


def test_every_setting_round_trips_through_the_command_line():
    values = {f.name: _other_value(f) for f in FIELDS}
    for f in FIELDS:
        assert values[f.name] != f.default, f.name  # each option is really exercised
    assert _round_trip(values) == values


def test_flags_round_trip_both_ways_and_none_is_not_given():
    flags = [f for f in FIELDS if f.type.startswith("bool")]
    assert {"bias", "qk_norm", "compile", "tf32", "activation_checkpointing"} <= {f.name for f in flags}
    for value in (True, False):  # compile's default is None: both --compile and --no-compile mean something
        values = {f.name: value for f in flags}
        assert _round_trip(values) == {f.name: values.get(f.name) for f in FIELDS}
    assert to_argv({"compile": None, "eps": None, "lr_decay_steps": None}) == []
    assert _parse([]) == {f.name: None for f in FIELDS}


def test_a_hand_written_command_line_round_trips():
    argv = ["--preset", "small", "--optimizer", "adamw", "--out-dir", "runs/my run", "--corpus", "-odd name.txt",
            "--tokenizer", "bpe:512", "--lr", "3e-4", "--min-lr", "0.000030000000000000004", "--weight-decay",
            "-0.5", "--eps", "1e-12", "--lr-decay-steps", "900", "--seed", "-3", "--no-bias", "--qk-norm",
            "--no-compile", "--parallel", "fsdp", "--muon-ns-dtype", "float32", "--dist-timeout-min", "inf"]
    # a string starting with "-" cannot follow its option: argparse would read it as one
    argv[argv.index("--corpus"):argv.index("--corpus") + 2] = ["--corpus=-odd name.txt"]
    parsed = _round_trip(_parse(argv))
    assert parsed["corpus"] == "-odd name.txt" and parsed["out_dir"] == "runs/my run"
    assert parsed["lr"] == 3e-4 and parsed["min_lr"] == 0.000030000000000000004 and parsed["weight_decay"] == -0.5
    assert parsed["seed"] == -3 and parsed["lr_decay_steps"] == 900 and parsed["dist_timeout_min"] == float("inf")
    assert parsed["bias"] is False and parsed["qk_norm"] is True and parsed["compile"] is False
    assert parsed["eval_every"] is None  # not given: the preset's


def test_to_argv_names_an_unknown_setting():
    with pytest.raises(TrainError, match="unknown setting 'learning_rate'"):
        to_argv({"learning_rate": 1e-3})


def test_every_setting_has_its_option_with_its_help_and_default():
    parser = argparse.ArgumentParser(prog="sophia train")
    add_arguments(parser)
    options = {a.dest: a for a in parser._actions}
    for f in FIELDS:
        assert f.default is not MISSING
        action = options[f.name]
        assert action.option_strings[0] == "--" + f.name.replace("_", "-")
        if not f.metadata["own_option"]:  # the preset's settings: the help is the field's, then its default
            assert action.help.startswith(f.metadata["help"]), f.name
            assert action.help.endswith(f"default: the preset's, else {f.default!r}"), f.name


def test_choices_are_checked_with_a_message_naming_them():
    with_choices = {f.name: f.metadata["choices"] for f in FIELDS if f.metadata["choices"]}
    assert with_choices["parallel"] == ("ddp", "fsdp") and with_choices["dtype"] == ("auto", "float32", "bfloat16")
    expected = {"parallel": "ddp or fsdp", "dtype": "auto, float32 or bfloat16", "muon_ns_dtype": "bfloat16 or float32"}
    for name, words in expected.items():
        with pytest.raises(TrainError, match=f"^--{name.replace('_', '-')} must be {words}, got 'nope'$"):
            TrainConfig(**{name: "nope"}).validate()
    for name, choices in with_choices.items():
        for choice in choices:
            TrainConfig(**{name: choice}).validate()


def test_a_resume_changes_exactly_the_resumable_settings():
    assert {"lr", "min_lr", "max_steps", "lr_decay_steps", "eval_every", "device", "compile"} <= RESUME_CHANGEABLE
    assert set(SCHEDULE_CHANGES) == {"max_steps", "lr", "min_lr", "lr_decay_steps"}
    assert not {"n_layer", "corpus", "tokenizer", "rho", "seed", "parallel", "batch_size"} & RESUME_CHANGEABLE
    saved = TrainConfig().to_dict()
    valid = {"lr": 1e-3, "min_lr": 1e-4, "max_steps": 2000, "lr_decay_steps": 500, "device": "cpu",
             "data_root": "elsewhere", "device_memory_gib": 2.0, "peak_tflops": 2.0}
    for f in FIELDS:
        value = valid.get(f.name, _other_value(f))
        changes: dict = {}
        if f.metadata["resumable"]:
            cfg = resume_config(saved, {f.name: value}, changes)
            assert getattr(cfg, f.name) == value
            assert (f.name in changes) == (f.metadata["resumable"] == "schedule"), f.name
        else:
            flag = "--" + f.name.replace("_", "-")
            with pytest.raises(TrainError, match=f"continues the saved settings: {flag} was"):
                resume_config(saved, {f.name: value}, changes)


def test_settings_some_optimizers_ignore_are_named():
    assert USED_BY["rho"] == ("sophiag", "sophiah") and USED_BY["muon_lr"] == ("muon",)
    assert "hessian_interval" in USED_BY and "lr" not in USED_BY
    given = {name: _other_value(next(f for f in FIELDS if f.name == name)) for name in USED_BY}
    assert unused_settings("muon", given) == [n for n in USED_BY if n not in ("muon_lr", "muon_ns_dtype")]
    assert unused_settings("adahessian", given) == [n for n in USED_BY if n != "hessian_interval"]
    assert unused_settings("sophiag", {"rho": None, "muon_lr": 0.01}) == ["muon_lr"]  # None: not given
