"""The default experiment (`DEFAULT_EXPERIMENT`, over `EXPERIMENT_BASE`), its pinned teacher, and
`load_experiment`: a user's experiment file merged over the default and checked whole."""

from __future__ import annotations

import copy
import os

from .. import schema
from ..config import (ASSETS, DEFAULT_CONFIG, ConfigError, check_backend, merge_config, read_json_object,
                      train_config, validate_config)
from .grid import arms, check_arms, main_runs, run_configs, run_options

PINNED_TEACHER = os.path.join(ASSETS, "addition_any_teacher.safetensors")

# The task, teacher and student of the default experiment, over `hpd distill`'s default config.
# The teacher is pinned: its weights are committed (trained once by `TEACHER_RECIPE`), so every
# rerun distils from the same teacher whatever the machine's thread count.
TEACHER_DECODER = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_positions": 96}
TEACHER_RECIPE = {"objective": "sft", "steps": 5000, "batch_size": 32, "lr": 3e-3, "warmup_steps": 30, "seed": 0}
EXPERIMENT_BASE = {
    "task": {"orders": "any", "max_terms": 5, "eval_problems": 1000},
    "teacher": {"decoder": TEACHER_DECODER, "checkpoint": PINNED_TEACHER},
    "student": {"decoder": {"hidden_size": 48, "num_layers": 2, "num_heads": 2, "max_positions": 96},
                "warmup": {"objective": "sft", "steps": 1200, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20,
                           "seed": 1}},
}

DEFAULT_EXPERIMENT = {
    "data": "teacher",   # what the arms distil on: the teacher's samples ("teacher") or the gold solutions
    "objectives": ["sft", "fkl", "rkl", "jsd", "skl", "hpd"],   # sft on the teacher's samples: SeqKD
    "oracle": True,      # also sft on the gold solutions, reported as an oracle
    "seeds": [0, 1, 2, 3, 4],
    # The arms listed one by one (name, objective, options, data, teacher_temperature, seeds, lr);
    # []: the arms of `objectives`, `oracle` and `sweep`.
    "arms": [],
    # One warm student (warmed up at this seed) for every run, or None: one per seed.
    "warm_seed": None,
    # Distillation continues the warm-up's AdamW state (moments and step counts) instead of a fresh one.
    "continue_warmup": False,
    # Steps at which every run (that reaches them) is evaluated with all `eval.samples` draws and
    # compared, besides its last step.
    "budgets": [],
    # More pre-registered paired comparisons ({"treatment", "control"}), reported like the primary one.
    "comparisons": [],
    # Shared by every run; `objective` and `seed` are set per run, `lr` by the tuning.
    "distill": {"steps": 800, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "eval_every": 200,
                "save_every": 200},
    # extend: how many rates an arm's grid may grow by when its best is at an end (see tuning_runs);
    # one rate in lr: no tuning, every arm at that rate
    # steps: the tuning runs' length (None: each arm's own)
    "tuning": {"lr": [1e-3, 3e-3, 1e-2], "seed": 100, "validation_problems": 500, "extend": 2, "steps": None},
    "sweep": {"fkl_weight": [], "rkl_weight": [], "on_policy_fraction": [1.0]},
    "teacher_data": {"seed": 0, "temperature": 1.0},
    "eval": {"max_new_tokens": 48, "temperature": 1.0, "top_p": 0.7, "seed": 0, "samples": 4},
    # Pre-registered: the metric and the paired comparison that the experiment reports first.
    # budget: the step it is compared at (None: each run's last).
    "primary": {"metric": "top_p_accuracy", "treatment": "hpd", "control": "fkl", "budget": None},
    # Over EXPERIMENT_BASE, over `hpd distill`'s default config; its distill, eval and device are the
    # experiment's own keys above (schema.BASE_SET_BY_THE_EXPERIMENT refuses them in base).
    "base": {},
}

EXPERIMENT_KEYS = schema.EXPERIMENT.fields  # every key, its type and range: see schema.py
MERGED = ("sweep", "eval", "distill", "tuning", "teacher_data", "primary")  # merged key by key


def load_experiment(path=None, device=None):
    """The default experiment, overridden key by key by the JSON file at `path`, and checked whole:
    every key by the schema, `base` merged and checked as `hpd distill`'s config, the primary
    comparison's arms, and the `TrainConfig` of every planned run and warm-up, before anything is
    written. `device` (`--device`) replaces the file's."""
    experiment = copy.deepcopy(DEFAULT_EXPERIMENT)
    source = path or "the default experiment"
    if path is not None:
        written = _merge_file(experiment, path)
        listed = [key for key in ("objectives", "oracle", "sweep") if key in written]
        if written.get("arms") and listed:
            raise ConfigError(f"{path}: {', '.join(listed)} would not be used: an experiment with 'arms' runs "
                              f"exactly the arms it lists (list these there)")
    if device is not None:
        schema.DEVICE.check(device, schema.COMMAND_LINE, "--device")
        experiment["device"] = device
    for key in ("objective", "seed"):
        if isinstance(experiment["distill"], dict) and key in experiment["distill"]:
            raise ConfigError(f"{source}: distill.{key} is set per run (use 'objectives' and 'seeds')")
    schema.EXPERIMENT.check(experiment, source, "")
    base_dir = os.path.dirname(os.path.abspath(path)) if path is not None else os.getcwd()
    experiment["base"] = _merged_base(experiment, base_dir, source)
    _check_plan(experiment, source)
    return experiment


def _merge_file(experiment, path):
    """The experiment file's keys over `experiment` (the sections of `MERGED` key by key); returns
    the file's own keys and values."""
    user = read_json_object(path, "experiment file")
    for key, value in user.items():
        if key not in EXPERIMENT_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}; known keys: {sorted(EXPERIMENT_KEYS)}")
        if key in MERGED and isinstance(value, dict):
            experiment[key].update(value)
        else:
            experiment[key] = value
    return user


def _check_plan(experiment, source):
    """The arms' rules, the compared arms exist, the budgets are evaluation steps, and every planned
    run's options are a valid config."""
    check_arms(experiment, source)
    groups = {arm.group for arm in arms(experiment)}
    compared = [("primary", experiment["primary"])] + [(f"comparisons[{index}]", pair)
                                                       for index, pair in enumerate(experiment["comparisons"])]
    for where, pair in compared:
        for role in ("treatment", "control"):
            if pair.get(role) not in groups:
                schema.fail(source, f"{where}.{role}", f"one of the experiment's arms ({', '.join(sorted(groups))})",
                            pair.get(role))
    if experiment["continue_warmup"] and not experiment["base"]["student"].get("warmup"):
        schema.fail(source, "continue_warmup", "false when the student has no warm-up (base.student.warmup)", True)
    budgets = experiment["budgets"] + ([experiment["primary"]["budget"]] if experiment["primary"]["budget"] else [])
    for run in main_runs(experiment):
        options = run_options(experiment, run)
        for budget in budgets:
            if budget < options["steps"] and not (options["eval_every"] and budget % options["eval_every"] == 0):
                schema.fail(source, "budgets", f"steps at which run {run.name} evaluates (multiples of its "
                            f"eval_every, {options['eval_every']}, or its last step {options['steps']})", budget)
    for where, options in run_configs(experiment).items():  # every planned run's options, checked now
        check_backend(train_config(options, source, where), experiment.get("device", "auto"), source, where)


def load_experiment_from_base(**base):
    """The default experiment with `base` sections replaced (a teacher to train, for instance),
    without reading a file."""
    experiment = copy.deepcopy(DEFAULT_EXPERIMENT)
    experiment["base"] = _merged_base({**experiment, "base": base}, ASSETS, "the default experiment")
    return experiment


def _merged_base(experiment, base_dir, source):
    """`hpd distill`'s default config, under `EXPERIMENT_BASE`, under the experiment's own `base`
    (paths in it relative to `base_dir`), with the experiment's evaluation; checked whole."""
    base = merge_config(merge_config(DEFAULT_CONFIG, EXPERIMENT_BASE, ASSETS, "the default experiment",
                                     prefix="base."), experiment["base"], base_dir, source, prefix="base.")
    base["eval"] = {key: value for key, value in experiment["eval"].items() if key != "samples"}
    base["distill"] = {}  # every run's options: the experiment's `distill`, merged per run by `run_options`
    validate_config(base, source, "base")
    return base
