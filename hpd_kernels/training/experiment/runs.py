"""One run of an experiment, trained (or resumed) and summarised in its `summary.json`; and the
warm student every run of a seed starts from, trained once."""

from __future__ import annotations

import copy
import os
import statistics
import time

import torch

from ..checkpoint import load_model, record_sha256, save_model, verify_sha256
from ..config import train_config
from ..evaluation import evaluate_with_samples, final_evaluation
from ..jsonfiles import write_json_atomic
from ..report import stability, summary_path
from ..trainer import train
from ..workload import build_model
from .grid import run_options, warm_seed


def execute(run, out_dir, context, commit, progress=True):
    """Train one run (resuming its checkpoint if any) and write its `summary.json`."""
    experiment, workload = context.experiment, context.workload
    eval_config = experiment["base"]["eval"]
    run_dir = os.path.join(out_dir, "runs", run.name)
    seed = warm_seed(experiment, run.seed)
    student = warm_student(context, seed, out_dir)
    examples = context.examples(run)
    config = workload.distill_config(run_options(experiment, run), "config", f"run {run.name}")
    scored = workload.scored_on(workload.validation_problems) if run.tuning else workload
    # Every draw at a compared step; one at the others (the learning curve).
    compared = {config.steps, *experiment["budgets"], experiment["primary"]["budget"]}
    context.common["log"](f"run {run.name}")
    run_started = time.perf_counter()
    history = train(config, student, context.teacher, examples, run_dir=run_dir, label=run.name, progress=progress,
                    evaluate=lambda model, step: evaluate_with_samples(
                        model, scored, eval_config, context.teacher, context.samples if step in compared else 1),
                    initial_optimizer=warm_run_dir(out_dir, seed) if experiment["continue_warmup"] else None,
                    **context.common)
    summary = {"name": run.name, "group": run.group, "seed": run.seed, "data": run.data, "tuning": run.tuning,
               "teacher_temperature": context.teacher_temperature(run) if run.data == "teacher" else None,
               "warm_seed": seed,
               "config": config.to_dict(), "final": final_evaluation(history),
               "stability": stability(history, config.max_grad_norm),
               "efficiency": {"step_time_ms_mean": 1000 * statistics.fmean(r["step_time_s"] for r in history),
                              "train_seconds": sum(r["step_time_s"] for r in history),
                              "wall_seconds_this_invocation": time.perf_counter() - run_started,
                              "peak_memory_mb": max(r["peak_memory_mb"] for r in history),
                              "tokens_per_s_mean": statistics.fmean(r["tokens_per_s"] for r in history)},
               "threads": torch.get_num_threads(), "commit": commit}
    write_json_atomic(summary_path(out_dir, run.name), summary)


def warm_weights(out_dir, seed):
    return os.path.join(out_dir, f"warmup-seed{seed}", "student.safetensors")


def warm_run_dir(out_dir, seed):
    """The warm-up's run directory: its last checkpoint holds the optimizer state a run continues."""
    return os.path.join(out_dir, f"warmup-seed{seed}", "run")


def warm_student(context, seed, out_dir):
    """The student after its `sft` warm-up (on the gold data) for `seed`, trained once and reused
    by every run."""
    base, workload = context.experiment["base"], context.workload
    weights = warm_weights(out_dir, seed)
    folder = os.path.dirname(weights)
    section = copy.deepcopy(base["student"])
    warmup = section.get("warmup")
    if warmup:
        section["warmup"] = {**warmup, "seed": seed}
    torch.manual_seed(seed)
    student = build_model({**section, "train": {"seed": seed}}, workload.tokenizer, "student", context.device,
                          cache_dir=workload.cache_dir)
    if os.path.isfile(weights):
        verify_sha256(weights)
        load_model(student, weights)
        return student
    if warmup:
        train(train_config(section["warmup"], "config", "student.warmup"), student, None, workload.examples,
              run_dir=warm_run_dir(out_dir, seed), label=f"warm-up seed {seed}", **context.common)
    evaluation = {"test": evaluate_with_samples(student, workload, base["eval"], context.teacher, context.samples)}
    if workload.validation_problems:
        evaluation["validation"] = evaluate_with_samples(student, workload.scored_on(workload.validation_problems),
                                                         base["eval"], context.teacher, context.samples)
    write_json_atomic(os.path.join(folder, "evaluation.json"), evaluation)
    save_model(student, weights)
    record_sha256(weights)
    return student
