"""`hpd experiment`: every objective against HPD on the same teacher, data, optimiser and budget.

For each seed, the student is initialised and warmed up with `sft` once (that seed's "student
before"); every objective then continues from that same warm student, with the same `distill`
options (steps, batch size, learning rate and schedule, clipping, evaluation), only `objective`
differing. The seed also fixes the batches and the sampling noise of the distillation, so two
objectives at one seed see the same examples in the same order (a paired comparison).

A sensitivity sweep reruns HPD over a grid of `fkl_weight` x `rkl_weight`, and with
`on_policy_fraction` > 0 (full student rollouts) against the approximate on-policy default.

Each run lives in `<out>/runs/<name>/` (trainer checkpoints, metrics) and is marked finished by its
`summary.json`: an interrupted experiment resumes the unfinished runs from their checkpoints and
never redoes a finished one. The report (`results.md`, `results.json`, PNG plots; see `report`)
is rebuilt from the summaries at the end of every invocation.
"""

from __future__ import annotations

import copy
import os
import statistics
import subprocess
import time

import torch

from . import schema
from .checkpoint import load_model, record_sha256, save_model, verify_sha256
from .config import (DEFAULT_CONFIG, ConfigError, check_backend, merge_config, read_json_object, train_config,
                     validate_config)
from .evaluation import evaluate_with_samples, final_evaluation
from .jsonfiles import write_json_atomic
from .locks import die_with_parent
from .pipeline import choose_device
from .report import stability, write_report
from .rundir import claim_output_dir, default_cache_dir, lock_output_dir, prepare_teacher
from .trainer import train
from .workload import Workload, build_model

DEFAULT_EXPERIMENT = {
    "objectives": ["sft", "fkl", "rkl", "jsd", "skl", "hpd"],
    "seeds": [0, 1, 2],
    # Shared by every run; `objective` and `seed` are set per run.
    "distill": {"steps": 1000, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "eval_every": 200,
                "save_every": 250},
    "sweep": {"fkl_weight": [0.5, 1.0, 2.0], "rkl_weight": [0.5, 1.0, 2.0], "on_policy_fraction": [0.5],
              "seeds": [0, 1]},
    "eval": {"max_new_tokens": 48, "temperature": 1.0, "seed": 0, "samples": 4},
    # Everything else (task or data, teacher, student and its warm-up) comes from `hpd distill`'s
    # default config, overridable under "base".
    "base": {},
}

EXPERIMENT_KEYS = schema.EXPERIMENT.fields  # every key, its type and range: see schema.py


def load_experiment(path=None, device=None):
    """The default experiment, overridden key by key by the JSON file at `path`, and checked whole:
    every key by the schema, `base` merged and checked as `hpd distill`'s config, and the
    `TrainConfig` of every planned run and warm-up, before anything is written. `device`
    (`--device`) replaces the file's."""
    experiment = copy.deepcopy(DEFAULT_EXPERIMENT)
    source = path or "the default experiment"
    if path is not None:
        user = read_json_object(path, "experiment file")
        for key, value in user.items():
            if key not in EXPERIMENT_KEYS:
                raise ConfigError(f"{path}: unknown key {key!r}; known keys: {sorted(EXPERIMENT_KEYS)}")
            if key in ("sweep", "eval", "distill") and isinstance(value, dict):
                experiment[key].update(value)
            else:
                experiment[key] = value
    if device is not None:
        schema.DEVICE.check(device, schema.COMMAND_LINE, "--device")
        experiment["device"] = device
    for key in ("objective", "seed"):
        if isinstance(experiment["distill"], dict) and key in experiment["distill"]:
            raise ConfigError(f"{source}: distill.{key} is set per run (use 'objectives' and 'seeds')")
    schema.EXPERIMENT.check(experiment, source, "")
    base_dir = os.path.dirname(os.path.abspath(path)) if path is not None else os.getcwd()
    base = merge_config(DEFAULT_CONFIG, experiment["base"], base_dir, source, prefix="base.")
    base["eval"] = {key: value for key, value in experiment["eval"].items() if key != "samples"}
    base["distill"] = {}
    validate_config(base, source, "base")
    experiment["base"] = base
    for where, options in run_configs(experiment).items():  # every planned run's options, checked now
        check_backend(train_config(options, source, where), experiment.get("device", "auto"), source, where)
    return experiment


def run_configs(experiment):
    """`{where: options}` of every warm-up and planned run, merged as `_warm_student` and `_execute`
    merge them; `where` names the run in errors."""
    configs = {}
    warmup = experiment["base"]["student"].get("warmup")
    for name, _, seed, overrides in planned_runs(experiment):
        if warmup:
            configs[f"student.warmup (seed {seed})"] = {**warmup, "seed": seed}
        configs[f"run {name}"] = {**experiment["distill"], **overrides, "seed": 1000 + seed}
    return configs


def planned_runs(experiment):
    """`[(name, group, seed, TrainConfig overrides)]`: the main grid, then the HPD sweep."""
    runs = []
    for objective in experiment["objectives"]:
        for seed in experiment["seeds"]:
            runs.append((f"{objective}-seed{seed}", objective, seed, {"objective": objective}))
    sweep = experiment["sweep"]
    for fkl_weight in sweep.get("fkl_weight", []):
        for rkl_weight in sweep.get("rkl_weight", []):
            if (fkl_weight, rkl_weight) == (1.0, 1.0) and "hpd" in experiment["objectives"]:
                continue  # the main grid's hpd
            group = f"hpd fkl={fkl_weight:g} rkl={rkl_weight:g}"
            for seed in sweep.get("seeds", experiment["seeds"]):
                runs.append((f"hpd-fkl{fkl_weight:g}-rkl{rkl_weight:g}-seed{seed}", group, seed,
                             {"objective": "hpd", "fkl_weight": fkl_weight, "rkl_weight": rkl_weight}))
    for fraction in sweep.get("on_policy_fraction", []):
        if fraction == 0:
            continue
        group = f"hpd on-policy={fraction:g}"
        for seed in sweep.get("seeds", experiment["seeds"]):
            runs.append((f"hpd-onpolicy{fraction:g}-seed{seed}", group, seed,
                         {"objective": "hpd", "on_policy_fraction": fraction}))
    return runs


def _git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (commit + ("+uncommitted-changes" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_experiment(experiment, out_dir, *, cache_dir=None, log=print, only=None, workers=1):
    """Run (or resume) every planned run, then write the report; returns the report dict.
    `only` limits this invocation to the first `only` unfinished runs (a time-sliced job);
    `workers` > 1 runs that many runs at once in separate processes (one CPU thread each)."""
    base = experiment["base"]
    device = choose_device(experiment.get("device", "auto"))
    cache_dir = cache_dir or default_cache_dir()
    workload = Workload(base, cache_dir, log)
    workload.check_positions(list(run_configs(experiment).values()))
    teacher = build_model(base["teacher"], workload.tokenizer, "teacher", device, cache_dir=cache_dir, log=log)
    build_model(base["student"], workload.tokenizer, "student", device, cache_dir=cache_dir)  # checks the student before writing
    # One invocation at a time in `out_dir`, held until this returns or raises (or the process is
    # killed); the workers run inside it and do not take it.
    with lock_output_dir(out_dir, "hpd experiment"):
        return _run_locked(experiment, out_dir, cache_dir, log, only, workers, base, device, workload, teacher)


def _run_locked(experiment, out_dir, cache_dir, log, only, workers, base, device, workload, teacher):
    claim_output_dir(out_dir, {key: value for key, value in experiment.items()}, workload.fingerprint())
    teacher, _ = prepare_teacher(teacher, base, workload, cache_dir, log)
    samples = experiment["eval"].get("samples", 1)
    teacher_path = os.path.join(out_dir, "teacher_evaluation.json")
    if not os.path.isfile(teacher_path):
        write_json_atomic(teacher_path, evaluate_with_samples(teacher, workload, base["eval"], None, samples))
    common = workload.train_options(log)
    for seed in sorted({seed for _, _, seed, _ in planned_runs(experiment)}):  # warm-ups first, once each
        _warm_student(base, workload, seed, device, out_dir, teacher, samples, common)
    started = time.perf_counter()
    commit = _git_commit()  # the code this process imported, not whatever is checked out when a run ends
    pending = [run for run in planned_runs(experiment)
               if not os.path.isfile(os.path.join(out_dir, "runs", run[0], "summary.json"))]
    if only is not None:
        pending = pending[:only]
    if workers > 1 and len(pending) > 1:
        import multiprocessing

        # Rollout runs are the longest: start them first so that the workers finish together.
        pending.sort(key=lambda run: -run[3].get("on_policy_fraction", 0))
        jobs = [(experiment, out_dir, cache_dir, run, commit) for run in pending]
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                       initargs=(os.getpid(),)) as pool:
            for name in pool.imap_unordered(_run_in_worker, jobs):
                log(f"finished {name}")
    else:
        for run in pending:
            _execute(run, experiment, out_dir, workload, teacher, device, samples, common, commit)
    report = write_report(experiment, planned_runs(experiment), out_dir)
    report["seconds_this_invocation"] = time.perf_counter() - started
    return report


def _init_worker(parent_pid):
    """One CPU thread; and killed with the parent, whose lock on the output directory it works under."""
    die_with_parent(parent_pid)
    torch.set_num_threads(1)


def _run_in_worker(job):
    """One run in a worker process: data, cached teacher and warm student rebuilt from disk."""
    experiment, out_dir, cache_dir, run, commit = job
    base = experiment["base"]
    device = choose_device(experiment.get("device", "auto"))
    workload = Workload(base, cache_dir)
    teacher = build_model(base["teacher"], workload.tokenizer, "teacher", device, cache_dir=cache_dir)
    teacher, _ = prepare_teacher(teacher, base, workload, cache_dir, lambda *_: None)
    samples = experiment["eval"].get("samples", 1)
    common = workload.train_options(log=lambda *_: None)
    _execute(run, experiment, out_dir, workload, teacher, device, samples, common, commit, progress=False)
    return run[0]


def _execute(run, experiment, out_dir, workload, teacher, device, samples, common, commit, progress=True):
    """Train one run (resuming its checkpoint if any) and write its `summary.json`."""
    name, group, seed, overrides = run
    base = experiment["base"]
    run_dir = os.path.join(out_dir, "runs", name)
    student = _warm_student(base, workload, seed, device, out_dir, teacher, samples, common)
    config = workload.distill_config({**experiment["distill"], **overrides, "seed": 1000 + seed}, "config",
                                     f"run {name}")
    common["log"](f"run {name}")
    run_started = time.perf_counter()
    history = train(config, student, teacher, workload.examples, run_dir=run_dir, label=name, progress=progress,
                    evaluate=lambda model, step: evaluate_with_samples(
                        model, workload, base["eval"], teacher, samples if step == config.steps else 1),
                    **common)
    summary = {"name": name, "group": group, "seed": seed, "config": config.to_dict(),
               "final": final_evaluation(history),
               "stability": stability(history, config.max_grad_norm),
               "efficiency": {"step_time_ms_mean": 1000 * statistics.fmean(r["step_time_s"] for r in history),
                              "train_seconds": sum(r["step_time_s"] for r in history),
                              "wall_seconds_this_invocation": time.perf_counter() - run_started,
                              "peak_memory_mb": max(r["peak_memory_mb"] for r in history),
                              "tokens_per_s_mean": statistics.fmean(r["tokens_per_s"] for r in history)},
               "threads": torch.get_num_threads(), "commit": commit}
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)


def _warm_student(base, workload, seed, device, out_dir, teacher, samples, common):
    """The student after its `sft` warm-up for `seed`, trained once and reused by every run."""
    folder = os.path.join(out_dir, f"warmup-seed{seed}")
    weights = os.path.join(folder, "student.safetensors")
    section = copy.deepcopy(base["student"])
    warmup = section.get("warmup")
    if warmup:
        section["warmup"] = {**warmup, "seed": seed}
    torch.manual_seed(seed)
    student = build_model({**section, "train": {"seed": seed}}, workload.tokenizer, "student", device,
                          cache_dir=workload.cache_dir)
    if os.path.isfile(weights):
        verify_sha256(weights)
        load_model(student, weights)
        return student
    if warmup:
        train(train_config(section["warmup"], "config", "student.warmup"), student, None, workload.examples,
              run_dir=os.path.join(folder, "run"), label=f"warm-up seed {seed}", **common)
    write_json_atomic(os.path.join(folder, "evaluation.json"),
                      evaluate_with_samples(student, workload, base["eval"], teacher, samples))
    save_model(student, weights)
    record_sha256(weights)
    return student
