"""The one schema of `hpd distill` and `hpd experiment`: every config key and command-line flag, its
type, range, choices or path rule, and the error each violation gets.

A spec checks one value and raises `ConfigError` with one line that names where the value came from
(a file, or "the command line"), its key (`distill.lr`, `--out`) and what is expected:

    cfg.json: distill.lr must be a finite number > 0, got -1

`Section` checks an object: unknown keys are errors, present keys are checked by their specs (the
defaults fill in the rest before the check). `TrainConfig`, `DecoderConfig`'s config section,
`validate_config` and `load_experiment` all check through these specs; the rules that relate keys
to each other (task or data, hf or decoder, ...) stay in `config.validate_config`. The kinds of
spec (`Int`, `Section`, ...) are defined in `specs`; this module puts them together.
"""

from __future__ import annotations

import json
import os

from ..ops.backends import CHOICES as BACKENDS
from ..registry import TRAINING_OBJECTIVES
from .specs import (Anything, Bool, Choice, ConfigError, Device, File, GGUFModel, HFModel, Int, ListOf,  # noqa: F401
                    Name, Number, Optional, Refused, Section, Spec, fail)

SEED_LIMIT = 2**63  # seeds are in [0, 2**63): torch.manual_seed takes up to 2**64 - 1, offsets included

# The (exclusive) upper bounds of the integer keys: far above any run of this trainer, so that a run
# can reach each of them given the time and memory, yet a value with digits to spare is refused
# before anything starts.
SEED = Int(0, SEED_LIMIT)
MAX_STEPS = 10**7      # optimiser steps; warmup_steps, eval_every and save_every count steps too
MAX_BATCH = 2**16      # sequences per micro-batch; micro-batches per optimiser step
MAX_TOKENS = 2**20     # tokens of one sequence: a decoder's max_positions, max_new_tokens
MAX_VOCAB = 2**24      # a built-in decoder's vocabulary (the largest public ones are ~2**18)
MAX_WIDTH = 2**16      # a built-in decoder's hidden_size
MAX_LAYERS = 2**10     # decoder layers (a Hugging Face model's too, when truncated); attention heads
MAX_PROBLEMS = 10**7   # problems made or scored: the task's, eval.limit, tuning.validation_problems
MAX_TERMS = 2**10      # terms of one addition problem
MAX_VALUE = 10**9      # the largest term of an addition problem
MAX_SAMPLES = 2**10    # sampled generations scored per problem (an experiment's eval.samples)
MAX_EXTEND = 16        # rates an arm's tuning grid may grow by (each is one more tuning run)
MAX_RUNS = 10**6       # --max-runs
MAX_WORKERS = 2**10    # --workers: processes at once


FRACTION = Number(0, 1)
POSITIVE = Number(0, low_open=True)
NON_NEGATIVE = Number(0)

# `TrainConfig`'s fields (training/trainer/options.py holds their defaults and meaning).
TRAIN = Section({
    "objective": Choice(*TRAINING_OBJECTIVES), "labels": Choice("data", "teacher_sample"),
    "steps": Int(1, MAX_STEPS), "batch_size": Int(1, MAX_BATCH), "grad_accum": Int(1, MAX_BATCH),
    "lr": POSITIVE, "min_lr_ratio": FRACTION, "warmup_steps": Int(0, MAX_STEPS),
    "schedule": Choice("cosine", "constant"), "weight_decay": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE, "temperature": POSITIVE,
    "fkl_weight": NON_NEGATIVE, "rkl_weight": NON_NEGATIVE, "beta": FRACTION, "alpha": FRACTION,
    "ce_weight": NON_NEGATIVE, "on_policy_fraction": FRACTION,
    "rollout_temperature": POSITIVE, "rollout_top_p": Number(0, 1, low_open=True),
    "max_new_tokens": Int(0, MAX_TOKENS), "precision": Choice("auto", "fp32", "bf16"),
    "eval_every": Int(0, MAX_STEPS), "save_every": Int(0, MAX_STEPS), "strategy": Choice("ddp", "fsdp"),
    "seed": SEED, "backend": Choice(*BACKENDS),
}, options="training option")

# `DecoderConfig`'s fields (models/decoder.py); hidden_size splitting into heads is checked there.
DECODER = Section({
    "vocab_size": Int(1, MAX_VOCAB), "hidden_size": Int(1, MAX_WIDTH), "num_layers": Int(1, MAX_LAYERS),
    "num_heads": Int(1, MAX_LAYERS), "mlp_ratio": POSITIVE, "max_positions": Int(1, MAX_TOKENS),
    "rope_base": POSITIVE, "tie_embeddings": Bool(),
})

TASK = Section({
    "name": Choice("addition"), "train_problems": Int(1, MAX_PROBLEMS), "eval_problems": Int(1, MAX_PROBLEMS),
    "min_terms": Int(1, MAX_TERMS), "max_terms": Int(1, MAX_TERMS), "max_value": Int(1, MAX_VALUE), "seed": SEED,
    "orders": Choice("two", "any"),
})

# top_p: also score sampling from the nucleus of mass top_p at `temperature` ("top_p_accuracy").
EVAL_FIELDS = {"max_new_tokens": Int(1, MAX_TOKENS), "temperature": POSITIVE, "seed": SEED,
               "limit": Optional(Int(1, MAX_PROBLEMS)),
               "top_p": Optional(Number(0, 1, low_open=True))}
EVAL = Section(EVAL_FIELDS)
# What `evaluation.evaluate_model` scores a model's generations by (top-p: with `eval.top_p`).
ACCURACIES = ("top_p_accuracy", "sampled_accuracy", "greedy_accuracy")
DEVICE = Device()


def _model(extra):
    # num_layers: a Hugging Face (hf or gguf) model truncated to its first N decoder layers.
    return Section({"hf": HFModel(), "gguf": GGUFModel(), "num_layers": Int(1, MAX_LAYERS), "decoder": DECODER,
                    "checkpoint": File("checkpoint file"), extra: TRAIN})


# `hpd distill --config` (and `hpd experiment`'s `base`), after merging with the defaults.
DISTILL = Section({
    "task": TASK, "data": File("data file"), "eval_data": File("evaluation data file"),
    "eval_fraction": Number(0, 1, low_open=True, high_open=True), "device": DEVICE,
    "teacher": _model("train"), "student": _model("warmup"), "distill": TRAIN, "eval": EVAL,
})

# `hpd distill`'s keys that an experiment sets itself, for every run alike: in its `base`, they are
# refused (they would not be used).
BASE_SET_BY_THE_EXPERIMENT = {
    "distill": Refused("an experiment's runs take their options from its own 'distill' (shared by every run; "
                       "objective and seed are set per run, lr by the tuning): give them there"),
    "eval": Refused("an experiment scores every model by its own 'eval': give the options there"),
    "device": Refused("an experiment runs on its own 'device' (or --device): give it there"),
}

# An arm of an experiment's `arms` list; `name` and `objective` are required, and `lr` (`tune`, a
# rate, or another arm's name) is checked with the other arms (`experiment.grid.check_arms`).
ARM = Section({
    "name": Name(), "objective": Choice(*TRAINING_OBJECTIVES),
    "options": Section({name: spec for name, spec in TRAIN.fields.items() if name not in ("objective", "seed", "lr")},
                       options="training option"),
    "data": Choice("teacher", "gold"), "teacher_temperature": POSITIVE, "seeds": ListOf(SEED, "seed"),
    "lr": Anything(),
})

# `hpd experiment --config`; its `base` is checked as `DISTILL` once merged.
EXPERIMENT = Section({
    "data": Choice("teacher", "gold"), "oracle": Bool(),
    "objectives": ListOf(Choice(*TRAINING_OBJECTIVES), "objective"), "seeds": ListOf(SEED, "seed"),
    "arms": ListOf(ARM, "arm", empty=True),   # []: the arms of `objectives`, `oracle` and `sweep`
    "warm_seed": Optional(SEED), "continue_warmup": Bool(),
    "budgets": ListOf(Int(1, MAX_STEPS), "budget", empty=True),
    "comparisons": ListOf(Section({"treatment": Anything(), "control": Anything()}), "comparison", empty=True),
    "distill": Section({name: spec for name, spec in TRAIN.fields.items() if name not in ("objective", "seed")},
                       options="training option"),
    "tuning": Section({"lr": ListOf(POSITIVE, "learning rate"), "seed": SEED,
                       "validation_problems": Int(1, MAX_PROBLEMS), "extend": Int(0, MAX_EXTEND),
                       "steps": Optional(Int(1, MAX_STEPS))}),
    "sweep": Section({"fkl_weight": ListOf(NON_NEGATIVE, "weight", empty=True),  # []: no sweep
                      "rkl_weight": ListOf(NON_NEGATIVE, "weight", empty=True),
                      "on_policy_fraction": ListOf(FRACTION, "fraction", empty=True)}),
    "teacher_data": Section({"seed": SEED, "temperature": POSITIVE}),
    "eval": Section({**EVAL_FIELDS, "samples": Int(1, MAX_SAMPLES)}),
    "primary": Section({"metric": Choice(*ACCURACIES), "budget": Optional(Int(1, MAX_STEPS)),
                        "treatment": Anything(), "control": Anything()}),  # arms: checked once planned
    # Its values: checked once merged. The keys an experiment sets itself are refused by name.
    "base": Section({**{name: Anything() for name in DISTILL.fields}, **BASE_SET_BY_THE_EXPERIMENT}),
    "device": DEVICE,
})

# The command line's flags besides paths (`--out`, `--cache-dir`: `check_writable_dir`) and the
# `distill` options (`--steps`, `--seed`, ...: checked as `TRAIN`'s fields, named by their flag).
# --device: DEVICE, by load_config and load_experiment.
FLAGS = {"--max-runs": Int(1, MAX_RUNS), "--workers": Int(1, MAX_WORKERS)}
COMMAND_LINE = "the command line"


def check_flags(values):
    """Check `{flag: value}` from the command line (None: not given)."""
    for flag, value in values.items():
        if value is not None:
            FLAGS[flag].check(value, COMMAND_LINE, flag)


def _nearest_existing(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable_dir(path, key, source=COMMAND_LINE, *, run_dir=False):
    """`path` is a directory that exists and is writable, or can be created; with `run_dir`, the
    `config.json` a run left there (if any) is a readable JSON file."""
    expected = "a writable directory"
    if not isinstance(path, str) or not path.strip():
        fail(source, key, "a directory path", path)
    if os.path.exists(path) and not os.path.isdir(path):
        fail(source, key, expected, path, "it is a file")
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        fail(source, key, expected, path, f"{existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(source, key, expected, path, f"{existing} is not writable")
    if run_dir:
        saved = os.path.join(path, "config.json")
        if os.path.exists(saved):
            if not os.path.isfile(saved):
                fail(source, key, "an hpd run directory or a new one", path, f"{saved} is not a file")
            try:
                with open(saved, encoding="utf-8-sig") as handle:
                    json.load(handle)
            except (OSError, ValueError) as error:
                fail(source, key, "an hpd run directory or a new one", path,
                     f"{saved} is not a readable JSON file: {error}")
