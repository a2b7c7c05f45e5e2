"""The config of `hpd distill` (and of `hpd experiment`'s `base`): defaults, merging, validation.

The config is a JSON object (the embedded default is `DEFAULT_CONFIG`; a user's file overrides
it section by section):

- `task` (the built-in addition task) or `data` (+ optional `eval_data`): JSON lines of
  `{"prompt": ..., "response": ...}`;
- `teacher`: `{"hf": path}`, or `{"decoder": {...}, "checkpoint": file}`, or
  `{"decoder": {...}, "train": {...}}` to train it from scratch with `sft` (cached on disk, keyed
  by everything that determines it, so the next run reuses it);
- `student`: `{"hf": path}` or `{"decoder": {...}}`, optional `checkpoint`, optional `warmup`
  (a short `sft` run before distillation: the "student before");
- `distill`: the distillation run's `TrainConfig`; `eval`: how models are scored; `device`.
"""

from __future__ import annotations

import copy
import json
import os

from ..models.decoder import DecoderConfig
from .trainer import TrainConfig

DEFAULT_CONFIG = {
    "task": {"name": "addition", "train_problems": 20000, "eval_problems": 400, "min_terms": 3, "max_terms": 4,
             "max_value": 20, "seed": 0},
    "teacher": {
        "decoder": {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "max_positions": 96},
        "train": {"objective": "sft", "steps": 1500, "batch_size": 32, "lr": 3e-3, "warmup_steps": 30, "seed": 0},
    },
    "student": {
        "decoder": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "max_positions": 96},
        "warmup": {"objective": "sft", "steps": 150, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "seed": 1},
    },
    "distill": {"objective": "hpd", "steps": 1500, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "seed": 2,
                "eval_every": 300, "save_every": 100},
    "eval": {"max_new_tokens": 48, "temperature": 1.0, "seed": 0},
    "device": "auto",
}

SECTIONS = {
    "task": {"name", "train_problems", "eval_problems", "min_terms", "max_terms", "max_value", "seed"},
    "data": None, "eval_data": None, "eval_fraction": None, "device": None,
    "teacher": {"hf", "decoder", "checkpoint", "train"},
    "student": {"hf", "decoder", "checkpoint", "warmup"},
    "distill": None,  # TrainConfig's fields, checked there
    "eval": {"max_new_tokens", "temperature", "seed", "limit"},
}


class ConfigError(ValueError):
    """A config that cannot be run: the message names the file and key."""


def read_json_object(path, what):
    """The JSON object in the file at `path`; errors name the file (and line) and say what is wrong."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return value


def load_config(path=None, overrides=None):
    """The default config, overridden by the JSON file at `path`, then by `overrides` (for the
    `distill` section). Relative paths in the file are taken relative to the file."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    source = "the default config"
    if path is not None:
        source = path
        config = merge_config(config, read_json_object(path, "config file"), os.path.dirname(os.path.abspath(path)),
                              path)
    if overrides:
        config["distill"].update({key: value for key, value in overrides.items() if value is not None})
    validate_config(config, source)
    return config


def merge_config(config, user, base_dir, source, prefix=""):
    """`config` overridden section by section by the user's object `user` (from a file in
    `base_dir`, named `source`; `prefix` names the section in messages): relative paths (`data`,
    `eval_data`, a model's `hf` or `checkpoint`) are taken relative to `base_dir`, the user's data
    replaces the built-in task, and a model given as `hf` or `decoder` replaces the default's way to
    build it. Shared by `hpd distill` and `hpd experiment`'s `base`; returns a new config."""
    config, user = copy.deepcopy(config), copy.deepcopy(user)
    for key in ("data", "eval_data"):
        if isinstance(user.get(key), str):
            user[key] = os.path.join(base_dir, user[key])
    for role in ("teacher", "student"):
        section = user.get(role)
        if isinstance(section, dict):
            for key in ("hf", "checkpoint"):
                if isinstance(section.get(key), str) and os.path.exists(os.path.join(base_dir, section[key])):
                    section[key] = os.path.join(base_dir, section[key])
    if "data" in user:  # the user's data replaces the built-in task
        config.pop("task", None)
    for role in ("teacher", "student"):  # a model given by path replaces the default's way to build one
        if isinstance(user.get(role), dict) and ("hf" in user[role] or "decoder" in user[role]):
            config[role] = {}
    for key, value in user.items():
        if key not in SECTIONS:
            raise ConfigError(f"{source}: unknown key {prefix}{key!r}; known keys: {sorted(SECTIONS)}")
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


def validate_config(config, source):
    """Refuse, naming `source` and the key, a config that `hpd distill` could not run."""
    if "task" in config and "data" in config:
        raise ConfigError(f"{source}: give either 'task' (the built-in task) or 'data', not both")
    if "task" not in config and "data" not in config:
        raise ConfigError(f"{source}: 'data' (a JSON-lines file of prompt/response) is required")
    for key, allowed in SECTIONS.items():
        if allowed is None or key not in config:
            continue
        if not isinstance(config[key], dict):
            raise ConfigError(f"{source}: {key!r} must be an object")
        for inner in config[key]:
            if inner not in allowed:
                raise ConfigError(f"{source}: unknown key {key}.{inner!r}; known keys: {sorted(allowed)}")
    if config.get("task", {}).get("name", "addition") != "addition":
        raise ConfigError(f"{source}: task.name must be 'addition' (the built-in task), got {config['task']['name']!r}")
    for role in ("teacher", "student"):
        section = config[role]
        if ("hf" in section) == ("decoder" in section):
            raise ConfigError(f"{source}: {role} needs exactly one of 'hf' (a Hugging Face model) or 'decoder' "
                              f"(the built-in model's sizes)")
        if "decoder" in section:
            decoder_config(section["decoder"], 1, f"{source}: {role}.decoder")
    teacher = config["teacher"]
    if "decoder" in teacher and "checkpoint" not in teacher and "train" not in teacher:
        raise ConfigError(f"{source}: a decoder teacher needs 'checkpoint' (trained weights) or 'train' "
                          f"(train it from scratch with sft)")
    for where, values in (("teacher.train", teacher.get("train")), ("student.warmup", config["student"].get("warmup")),
                          ("distill", config["distill"])):
        if values is not None:
            if train_config(values, f"{source}: {where}").strategy == "fsdp":
                raise ConfigError(f"{source}: {where}.strategy: hpd distill runs DDP under torchrun (it evaluates and "
                                  f"saves whole models on rank 0); FSDP2 is available in the trainer API, "
                                  f"train(TrainConfig(strategy='fsdp'), ...)")


def decoder_config(values, vocab_size, where):
    """The built-in decoder's `DecoderConfig` from a config section; `where` names it in errors."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be an object of DecoderConfig fields")
    known = set(DecoderConfig.__dataclass_fields__)
    for key in values:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {sorted(known)}")
    try:
        return DecoderConfig(**{"vocab_size": vocab_size, **values})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def train_config(values, where):
    """A `TrainConfig` from a config section; `where` names it in errors."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be an object of training options")
    try:
        return TrainConfig.from_dict(values, where)
    except KeyError as error:
        raise ConfigError(error.args[0]) from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None
