"""`hpd experiment`: every objective against HPD on the same teacher, data, optimiser and budget,
each at its own tuned learning rate, over paired seeds, with a primary metric fixed in advance.

The data regime is the recipe's (`data: "teacher"`): the pinned teacher samples one response per
training prompt (T=1, cached like a teacher: `teacher_data`), and every objective distils on
those sequences; `sft` on them is sequence-level KD (SeqKD), the baseline. SFT on the task's gold
solutions is reported as a labelled oracle (`oracle`), and HPD on the student's own rollouts
(`sweep.on_policy_fraction`, 1.0 by default) as the on-policy arm of the verl recipe.

1. **Tuning.** Each arm trains once per learning rate of `tuning.lr`, at the tuning seed, and is
   scored on a validation split (never the test problems) by the primary metric; where its best
   rate is an end of the grid, the grid grows past it (`tuning.extend` times at most); the best
   rate (the smaller one on a tie) is that arm's from then on (`lr_selection.json`).
2. **Main runs.** For each seed, the student is initialised and warmed up with `sft` on the gold
   data once (that seed's "student before"); every arm continues from that same warm student at
   its selected rate, all other options shared. The seed also fixes the batches and the sampling
   noise, so the arms are paired by seed.
3. **Report** (`report`): every arm's greedy, T=1 and top-p accuracy on the test problems, the
   pre-registered primary comparison (`primary`: the paired treatment - control difference of the
   primary metric over seeds, with its 95% t-interval), entropy, stability and efficiency.

Each run lives in `<out>/runs/<name>/` (trainer checkpoints, metrics) and is marked finished by its
`summary.json`: an interrupted experiment resumes the unfinished runs from their checkpoints and
never redoes a finished one. The report is rebuilt from the summaries at the end of every
invocation.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field

import torch

from . import schema
from .checkpoint import load_model, record_sha256, save_model, verify_sha256
from .config import (DEFAULT_CONFIG, ConfigError, check_backend, merge_config, read_json_object, train_config,
                     validate_config)
from .evaluation import evaluate_with_samples, final_evaluation
from .jsonfiles import write_json_atomic
from .locks import die_with_parent
from .pipeline import choose_device
from .report import stability, summary_path, write_report
from .rundir import claim_output_dir, default_cache_dir, lock_output_dir, prepare_teacher
from .teacher_data import teacher_data
from .trainer import train
from .workload import Workload, build_model

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
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
    # Shared by every run; `objective` and `seed` are set per run, `lr` by the tuning.
    "distill": {"steps": 800, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "eval_every": 200,
                "save_every": 200},
    # extend: how many rates an arm's grid may grow by when its best is at an end (see tuning_runs);
    # one rate in lr: no tuning, every arm at that rate
    "tuning": {"lr": [1e-3, 3e-3, 1e-2], "seed": 100, "validation_problems": 500, "extend": 2},
    "sweep": {"fkl_weight": [], "rkl_weight": [], "on_policy_fraction": [1.0]},
    "teacher_data": {"seed": 0, "temperature": 1.0},
    "eval": {"max_new_tokens": 48, "temperature": 1.0, "top_p": 0.7, "seed": 0, "samples": 4},
    # Pre-registered: the metric and the paired comparison that the experiment reports first.
    "primary": {"metric": "top_p_accuracy", "treatment": "hpd", "control": "fkl"},
    # Over EXPERIMENT_BASE, over `hpd distill`'s default config; its distill, eval and device are the
    # experiment's own keys above (schema.BASE_SET_BY_THE_EXPERIMENT refuses them in base).
    "base": {},
}

EXPERIMENT_KEYS = schema.EXPERIMENT.fields  # every key, its type and range: see schema.py
MERGED = ("sweep", "eval", "distill", "tuning", "teacher_data", "primary")  # merged key by key


@dataclass(frozen=True)
class Arm:
    """One way of training the student: `slug` names its runs, `group` its rows in the report."""

    slug: str
    group: str
    overrides: dict = field(default_factory=dict)  # TrainConfig options
    data: str = "teacher"                          # "teacher" (its samples) or "gold"


@dataclass(frozen=True)
class Run:
    name: str
    group: str
    seed: int
    overrides: dict   # TrainConfig options, `lr` included
    data: str
    tuning: bool = False


def load_experiment(path=None, device=None):
    """The default experiment, overridden key by key by the JSON file at `path`, and checked whole:
    every key by the schema, `base` merged and checked as `hpd distill`'s config, the primary
    comparison's arms, and the `TrainConfig` of every planned run and warm-up, before anything is
    written. `device` (`--device`) replaces the file's."""
    experiment = copy.deepcopy(DEFAULT_EXPERIMENT)
    source = path or "the default experiment"
    if path is not None:
        user = read_json_object(path, "experiment file")
        for key, value in user.items():
            if key not in EXPERIMENT_KEYS:
                raise ConfigError(f"{path}: unknown key {key!r}; known keys: {sorted(EXPERIMENT_KEYS)}")
            if key in MERGED and isinstance(value, dict):
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
    experiment["base"] = _merged_base(experiment, base_dir, source)
    groups = {arm.group for arm in arms(experiment)}
    for role in ("treatment", "control"):
        if experiment["primary"][role] not in groups:
            schema.fail(source, f"primary.{role}", f"one of the experiment's arms ({', '.join(sorted(groups))})",
                        experiment["primary"][role])
    for where, options in run_configs(experiment).items():  # every planned run's options, checked now
        check_backend(train_config(options, source, where), experiment.get("device", "auto"), source, where)
    return experiment


def arms(experiment):
    """The arms: each objective on the experiment's data (sft on the teacher's samples is named
    SeqKD), the oracle, then the HPD sweep (weights, and on-policy rollouts)."""
    data = experiment["data"]
    result = []
    for objective in experiment["objectives"]:
        name = "seqkd" if (objective, data) == ("sft", "teacher") else objective
        result.append(Arm(name, name, {"objective": objective}, data))
    if experiment["oracle"] and data == "teacher":
        result.append(Arm("sft-gold", "sft on gold (oracle)", {"objective": "sft"}, "gold"))
    sweep = experiment["sweep"]
    for fkl_weight in sweep["fkl_weight"]:
        for rkl_weight in sweep["rkl_weight"]:
            if (fkl_weight, rkl_weight) == (1.0, 1.0) and "hpd" in experiment["objectives"]:
                continue  # the main grid's hpd
            result.append(Arm(f"hpd-fkl{fkl_weight:g}-rkl{rkl_weight:g}", f"hpd fkl={fkl_weight:g} rkl={rkl_weight:g}",
                              {"objective": "hpd", "fkl_weight": fkl_weight, "rkl_weight": rkl_weight}, data))
    for fraction in sweep["on_policy_fraction"]:
        if fraction > 0:
            result.append(Arm(f"hpd-onpolicy{fraction:g}", f"hpd on-policy={fraction:g}",
                              {"objective": "hpd", "on_policy_fraction": fraction}, data))
    return result


def train_pinned_teacher(path=PINNED_TEACHER, log=print):
    """Train the default experiment's teacher by `TEACHER_RECIPE` in one CPU thread, and write it
    to `path` (with its recipe, and its evaluation on the test problems, in the metadata) and its
    sha256 beside it: how the committed teacher was made (`scripts/pin_teacher.py`). One thread
    makes it independent of the core count; another CPU architecture may still round differently."""
    from .evaluation import evaluate_model
    from .teacher_data import one_thread

    experiment = load_experiment_from_base(teacher={"decoder": TEACHER_DECODER, "train": TEACHER_RECIPE})
    base = experiment["base"]
    workload = Workload(base)
    teacher = build_model(base["teacher"], workload.tokenizer, "teacher", torch.device("cpu"))
    with one_thread():
        train(train_config(TEACHER_RECIPE, "TEACHER_RECIPE", "teacher.train"), teacher, None, workload.examples,
              label="pinned teacher sft", **workload.train_options(log))
        evaluation = evaluate_model(teacher, workload, base["eval"])
    log(f"pinned teacher: {evaluation}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_model(teacher, path, metadata={"decoder": json.dumps(TEACHER_DECODER), "recipe": json.dumps(TEACHER_RECIPE),
                                        "task": json.dumps(base["task"]), "evaluation": json.dumps(evaluation)})
    record_sha256(path)
    return evaluation


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
    base["distill"] = {}  # every run's options: the experiment's `distill`, merged per run by `_options`
    validate_config(base, source, "base")
    return base


def tuned(experiment):
    """Whether the learning rate is tuned per arm (more than one candidate)."""
    return len(experiment["tuning"]["lr"]) > 1


def tuning_runs(experiment, out_dir=None):
    """One run per arm and learning rate, at the tuning seed, evaluated on the validation split at
    its end only. The rates are `tuning.lr`, and (with `out_dir`, once an arm's rates have all
    finished there) its grid grows past whichever end scored best, by the ratio of that end to its
    neighbour, up to `tuning.extend` times: an optimum at the grid's edge is not taken as found."""
    if not tuned(experiment):
        return []
    runs = []
    for arm in arms(experiment):
        rates = sorted(experiment["tuning"]["lr"])
        for _ in range(experiment["tuning"]["extend"] if out_dir is not None else 0):
            scores = [_validation_score(experiment, out_dir, arm, rate) for rate in rates]
            if any(score is None for score in scores):
                break
            best = _best_rate(zip(scores, rates))
            if best == rates[0]:
                rates.insert(0, float(f"{rates[0] ** 2 / rates[1]:.0e}"))
            elif best == rates[-1]:
                rates.append(float(f"{rates[-1] ** 2 / rates[-2]:.0e}"))
            else:
                break
        runs += [_tuning_run(experiment, arm, rate) for rate in rates]
    return runs


def _tuning_run(experiment, arm, lr):
    return Run(f"tune-{arm.slug}-lr{lr:g}", arm.group, experiment["tuning"]["seed"],
               {**arm.overrides, "lr": lr, "eval_every": 0}, arm.data, tuning=True)


def _best_rate(scored):
    """The rate of the best `(score, rate)`, the smaller rate on a tie."""
    return max(scored, key=lambda pair: (pair[0], -pair[1]))[1]


def _validation_score(experiment, out_dir, arm, lr):
    """The primary metric of a finished tuning run on the validation split (None: not finished)."""
    run = _tuning_run(experiment, arm, lr)
    return _read_summary(out_dir, run)["final"][experiment["primary"]["metric"]] if _finished(out_dir, run) else None


def main_runs(experiment, selection=None):
    """The paired runs: every arm at every seed, at its selected learning rate (`selection`:
    `{group: lr}`). Without one: the one rate of an untuned `tuning.lr`, else (the tuning not
    done yet) `distill.lr`, a placeholder for planning and checking."""
    selection = selection or {}
    rate = experiment["distill"]["lr"] if tuned(experiment) else experiment["tuning"]["lr"][0]
    return [Run(f"{arm.slug}-seed{seed}", arm.group, seed,
                {**arm.overrides, "lr": selection.get(arm.group, rate)}, arm.data)
            for arm in arms(experiment) for seed in experiment["seeds"]]


def run_configs(experiment):
    """`{where: options}` of every warm-up and planned run, merged as `_warm_student` and `_execute`
    merge them; `where` names the run in errors."""
    configs = {}
    warmup = experiment["base"]["student"].get("warmup")
    for run in tuning_runs(experiment) + main_runs(experiment):
        if warmup:
            configs[f"student.warmup (seed {run.seed})"] = {**warmup, "seed": run.seed}
        configs[f"run {run.name}"] = _options(experiment, run)
    return configs


def _options(experiment, run):
    return {**experiment["distill"], **run.overrides, "seed": 1000 + run.seed}


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


def _finished(out_dir, run):
    return os.path.isfile(summary_path(out_dir, run.name))


def _read_summary(out_dir, run):
    with open(summary_path(out_dir, run.name)) as handle:
        return json.load(handle)


def select_learning_rates(experiment, out_dir):
    """`{group: {"lr": selected, "validation": {lr: score}}}` from the finished tuning runs: the
    rate with the best validation primary metric, the smaller one on a tie."""
    scores = {}
    for run in tuning_runs(experiment, out_dir):
        scores.setdefault(run.group, []).append((_read_summary(out_dir, run)["final"][experiment["primary"]["metric"]],
                                                 run.overrides["lr"]))
    return {group: {"lr": _best_rate(pairs),
                    "validation": {f"{lr:g}": score for score, lr in pairs}}
            for group, pairs in scores.items()}


class Context:
    """What every run of one experiment shares in one process: data, teacher and its samples."""

    def __init__(self, experiment, cache_dir, log=None):
        base = experiment["base"]
        self.experiment, self.cache_dir = experiment, cache_dir
        self.device = choose_device(experiment.get("device", "auto"))
        validation = experiment["tuning"]["validation_problems"] if tuned(experiment) else 0
        self.workload = Workload(base, cache_dir, log, validation=validation)
        self.teacher = build_model(base["teacher"], self.workload.tokenizer, "teacher", self.device,
                                   cache_dir=cache_dir, log=log)
        self.teacher_samples, self.teacher_data_info = None, None
        self.samples = experiment["eval"]["samples"]
        self.common = self.workload.train_options(log or (lambda *_: None))

    def prepare(self, log):
        """The teacher (trained and cached if the config says so) and its samples."""
        self.teacher, _ = prepare_teacher(self.teacher, self.experiment["base"], self.workload, self.cache_dir, log)
        if any(arm.data == "teacher" for arm in arms(self.experiment)):
            settings = self.experiment["teacher_data"]
            self.teacher_samples, self.teacher_data_info = teacher_data(
                self.teacher, self.workload, self.cache_dir, seed=settings["seed"],
                temperature=settings["temperature"], max_new_tokens=self.experiment["eval"]["max_new_tokens"], log=log)

    def examples(self, data):
        return self.teacher_samples if data == "teacher" else self.workload.examples


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
    if context.teacher_data_info is not None:
        write_json_atomic(os.path.join(out_dir, "teacher_data.json"), _describe_teacher_data(context))
    teacher_path = os.path.join(out_dir, "teacher_evaluation.json")
    if not os.path.isfile(teacher_path):
        write_json_atomic(teacher_path, evaluate_with_samples(context.teacher, context.workload,
                                                              experiment["base"]["eval"], None, context.samples))
    seeds = sorted({run.seed for run in tuning_runs(experiment) + main_runs(experiment)})
    cold = [seed for seed in seeds if not os.path.isfile(_warm_weights(out_dir, seed))]
    if workers > 1 and len(cold) > 1:  # the warm-ups, once each, before any run that continues one
        _in_pool(_warm_up_in_worker, [(experiment, out_dir, cache_dir, seed) for seed in cold], workers,
                 lambda seed: log(f"warmed up the student for seed {seed}"))
    for seed in seeds:
        _warm_student(context, seed, out_dir)
    started = time.perf_counter()
    commit = _git_commit()  # the code this process imported, not whatever is checked out when a run ends
    budget = [only]
    while budget[0] != 0:  # the tuning, round by round while some arm's grid grows
        pending = [run for run in tuning_runs(experiment, out_dir) if not _finished(out_dir, run)]
        if not pending:
            break
        _run_all(pending, experiment, out_dir, cache_dir, log, budget, workers, context, commit)
    selection = None
    if all(_finished(out_dir, run) for run in tuning_runs(experiment, out_dir)):
        selection = select_learning_rates(experiment, out_dir) if tuned(experiment) else {}
        write_json_atomic(os.path.join(out_dir, "lr_selection.json"), selection)
        _run_all(main_runs(experiment, {group: entry["lr"] for group, entry in selection.items()}),
                 experiment, out_dir, cache_dir, log, budget, workers, context, commit)
    planned = tuning_runs(experiment, out_dir) + main_runs(experiment, {group: entry["lr"] for group, entry in
                                                               (selection or {}).items()})
    report = write_report(experiment, planned, out_dir, selection)
    report["seconds_this_invocation"] = time.perf_counter() - started
    return report


def _describe_teacher_data(context):
    """How the distillation set was drawn, and how often the teacher's sample is right."""
    from .task import final_answer

    info = dict(context.teacher_data_info)
    problems = context.workload.train_problems
    if problems is not None:  # the built-in task: the samples' final answers can be checked
        right = [final_answer(context.workload.tokenizer.decode(response)) == problem[2]
                 for (_, response), problem in zip(context.teacher_samples, problems)]
        info["answer_correct_fraction"] = sum(right) / len(right)
    return info


def _run_all(runs, experiment, out_dir, cache_dir, log, budget, workers, context, commit):
    """Run the unfinished `runs`, at most `budget[0]` of them (None: all; the count left is kept)."""
    pending = [run for run in runs if not _finished(out_dir, run)]
    if budget[0] is not None:
        pending = pending[:budget[0]]
        budget[0] -= len(pending)
    if workers > 1 and len(pending) > 1:
        # Rollout runs are the longest: start them first so that the workers finish together.
        pending.sort(key=lambda run: -run.overrides.get("on_policy_fraction", 0))
        _in_pool(_run_in_worker, [(experiment, out_dir, cache_dir, run, commit) for run in pending], workers,
                 lambda name: log(f"finished {name}"))
    else:
        for run in pending:
            _execute(run, out_dir, context, commit)


def _in_pool(work, jobs, workers, done):
    """`work(job)` for every job in `workers` processes (one CPU thread each); `done(result)` as
    each finishes."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                   initargs=(os.getpid(),)) as pool:
        for result in pool.imap_unordered(work, jobs):
            done(result)


def _warm_up_in_worker(job):
    experiment, out_dir, cache_dir, seed = job
    context = Context(experiment, cache_dir)
    context.prepare(lambda *_: None)
    _warm_student(context, seed, out_dir)
    return seed


def _init_worker(parent_pid):
    """One CPU thread; and killed with the parent, whose lock on the output directory it works under."""
    die_with_parent(parent_pid)
    torch.set_num_threads(1)


def _run_in_worker(job):
    """One run in a worker process: data, teacher, its samples and the warm student from disk."""
    experiment, out_dir, cache_dir, run, commit = job
    context = Context(experiment, cache_dir)
    context.prepare(lambda *_: None)
    _execute(run, out_dir, context, commit, progress=False)
    return run.name


def _execute(run, out_dir, context, commit, progress=True):
    """Train one run (resuming its checkpoint if any) and write its `summary.json`."""
    experiment, workload = context.experiment, context.workload
    eval_config = experiment["base"]["eval"]
    run_dir = os.path.join(out_dir, "runs", run.name)
    student = _warm_student(context, run.seed, out_dir)
    examples = context.examples(run.data)
    config = workload.distill_config(_options(experiment, run), "config", f"run {run.name}")
    scored = workload.scored_on(workload.validation_problems) if run.tuning else workload
    context.common["log"](f"run {run.name}")
    run_started = time.perf_counter()
    history = train(config, student, context.teacher, examples, run_dir=run_dir, label=run.name, progress=progress,
                    evaluate=lambda model, step: evaluate_with_samples(
                        model, scored, eval_config, context.teacher, context.samples if step == config.steps else 1),
                    **context.common)
    summary = {"name": run.name, "group": run.group, "seed": run.seed, "data": run.data, "tuning": run.tuning,
               "config": config.to_dict(), "final": final_evaluation(history),
               "stability": stability(history, config.max_grad_norm),
               "efficiency": {"step_time_ms_mean": 1000 * statistics.fmean(r["step_time_s"] for r in history),
                              "train_seconds": sum(r["step_time_s"] for r in history),
                              "wall_seconds_this_invocation": time.perf_counter() - run_started,
                              "peak_memory_mb": max(r["peak_memory_mb"] for r in history),
                              "tokens_per_s_mean": statistics.fmean(r["tokens_per_s"] for r in history)},
               "threads": torch.get_num_threads(), "commit": commit}
    write_json_atomic(summary_path(out_dir, run.name), summary)


def _warm_weights(out_dir, seed):
    return os.path.join(out_dir, f"warmup-seed{seed}", "student.safetensors")


def _warm_student(context, seed, out_dir):
    """The student after its `sft` warm-up (on the gold data) for `seed`, trained once and reused
    by every run."""
    base, workload = context.experiment["base"], context.workload
    weights = _warm_weights(out_dir, seed)
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
              run_dir=os.path.join(folder, "run"), label=f"warm-up seed {seed}", **context.common)
    evaluation = {"test": evaluate_with_samples(student, workload, base["eval"], context.teacher, context.samples)}
    if workload.validation_problems:
        evaluation["validation"] = evaluate_with_samples(student, workload.scored_on(workload.validation_problems),
                                                         base["eval"], context.teacher, context.samples)
    write_json_atomic(os.path.join(folder, "evaluation.json"), evaluation)
    save_model(student, weights)
    record_sha256(weights)
    return student
