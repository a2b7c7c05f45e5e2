"""`run_experiment`: the order of an experiment's work in one output directory: the teacher and its
samples, the warm students, the tuning round by round, the learning-rate selection, the main runs,
then the report; resumable at any point, and limited to `only` runs per invocation if asked."""

from __future__ import annotations

import os
import subprocess
import time

from ..evaluation import evaluate_with_samples
from ..jsonfiles import write_json_atomic
from ..report import write_report
from ..rundir import claim_output_dir, default_cache_dir, lock_output_dir
from ..workload import build_model
from .context import Context
from .grid import finished, main_runs, run_configs, select_learning_rates, tuned, tuning_runs, warm_seed
from .teacher_data import ENTROPY_SAMPLES, teacher_data_file, teacher_entropy_on
from .runs import execute, warm_student, warm_weights
from .workers import in_pool, run_in_worker, warm_up_in_worker


def run_experiment(experiment, out_dir, *, cache_dir=None, log=print, only=None, workers=1):
    """Run (or resume) the tuning, then every main run, then write the report; returns the report
    dict. `only` limits this invocation to the first `only` unfinished runs (a time-sliced job);
    `workers` > 1 runs that many runs at once in separate processes (one CPU thread each)."""
    cache_dir = cache_dir or default_cache_dir()
    context = Context(experiment, cache_dir, log)
    context.workload.check_positions(list(run_configs(experiment).values()))
    build_model(experiment["base"]["student"], context.workload.tokenizer, "student", context.device,
                cache_dir=cache_dir)  # checks the student before writing
    # One invocation at a time in `out_dir`, held until this returns or raises (or the process is
    # killed); the workers run inside it and do not take it.
    with lock_output_dir(out_dir, "hpd experiment"):
        return _run_locked(experiment, out_dir, cache_dir, log, only, workers, context)


def _run_locked(experiment, out_dir, cache_dir, log, only, workers, context):
    claim_output_dir(out_dir, dict(experiment), context.workload.fingerprint())
    context.prepare(log)
    for temperature in context.teacher_samples:
        path = os.path.join(out_dir, teacher_data_file(experiment, temperature))
        if not os.path.isfile(path):
            write_json_atomic(path, _describe_teacher_data(context, temperature))
    teacher_path = os.path.join(out_dir, "teacher_evaluation.json")
    if not os.path.isfile(teacher_path):
        write_json_atomic(teacher_path, evaluate_with_samples(context.teacher, context.workload,
                                                              experiment["base"]["eval"], None, context.samples))
    seeds = sorted({warm_seed(experiment, run.seed) for run in tuning_runs(experiment) + main_runs(experiment)})
    cold = [seed for seed in seeds if not os.path.isfile(warm_weights(out_dir, seed))]
    if workers > 1 and len(cold) > 1:  # the warm-ups, once each, before any run that continues one
        in_pool(warm_up_in_worker, [(experiment, out_dir, cache_dir, seed) for seed in cold], workers,
                lambda seed: log(f"warmed up the student for seed {seed}"))
    for seed in seeds:
        warm_student(context, seed, out_dir)
    started = time.perf_counter()
    commit = _git_commit()  # the code this process imported, not whatever is checked out when a run ends
    budget = [only]
    while budget[0] != 0:  # the tuning, round by round while some arm's grid grows
        pending = [run for run in tuning_runs(experiment, out_dir) if not finished(out_dir, run)]
        if not pending:
            break
        _run_all(pending, experiment, out_dir, cache_dir, log, budget, workers, context, commit)
    selection = None
    if all(finished(out_dir, run) for run in tuning_runs(experiment, out_dir)):
        selection = select_learning_rates(experiment, out_dir) if tuned(experiment) else {}
        write_json_atomic(os.path.join(out_dir, "lr_selection.json"), selection)
        _run_all(main_runs(experiment, {group: entry["lr"] for group, entry in selection.items()}),
                 experiment, out_dir, cache_dir, log, budget, workers, context, commit)
    planned = tuning_runs(experiment, out_dir) + main_runs(experiment, {group: entry["lr"] for group, entry in
                                                               (selection or {}).items()})
    report = write_report(experiment, planned, out_dir, selection, warm_of=lambda seed: warm_seed(experiment, seed))
    report["seconds_this_invocation"] = time.perf_counter() - started
    return report


def _describe_teacher_data(context, temperature):
    """How the distillation set drawn at `temperature` was drawn, how often the teacher's sample is
    right, and (with listed arms) the teacher's entropy on it."""
    from ..task import final_answer

    info, samples = dict(context.teacher_data_info[temperature]), context.teacher_samples[temperature]
    problems = context.workload.train_problems
    if problems is not None:  # the built-in task: the samples' final answers can be checked
        right = [final_answer(context.workload.tokenizer.decode(response)) == problem[2]
                 for (_, response), problem in zip(samples, problems)]
        info["answer_correct_fraction"] = sum(right) / len(right)
    if context.experiment["arms"]:
        info["teacher_entropy"] = teacher_entropy_on(context.teacher, samples, context.workload.tokenizer)
        info["teacher_entropy_samples"] = min(ENTROPY_SAMPLES, len(samples))
    return info


def _run_all(runs, experiment, out_dir, cache_dir, log, budget, workers, context, commit):
    """Run the unfinished `runs`, at most `budget[0]` of them (None: all; the count left is kept)."""
    pending = [run for run in runs if not finished(out_dir, run)]
    if budget[0] is not None:
        pending = pending[:budget[0]]
        budget[0] -= len(pending)
    if workers > 1 and len(pending) > 1:
        # Rollout runs are the longest: start them first so that the workers finish together.
        pending.sort(key=lambda run: -run.overrides.get("on_policy_fraction", 0))
        in_pool(run_in_worker, [(experiment, out_dir, cache_dir, run, commit) for run in pending], workers,
                lambda name: log(f"finished {name}"))
    else:
        for run in pending:
            execute(run, out_dir, context, commit)


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
