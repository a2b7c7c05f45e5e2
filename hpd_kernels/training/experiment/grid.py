"""The experiment's grid: its arms (the ways of training the student), the tuning runs (each arm
at each learning rate, the grid growing past a best rate at its edge), the paired main runs (each
arm at each seed, at its selected rate), and the options each run trains with."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..report import summary_path


TUNE = "tune"  # an arm's `lr`: its own tuning round


@dataclass(frozen=True)
class Arm:
    """One way of training the student: `slug` names its runs, `group` its rows in the report."""

    slug: str
    group: str
    overrides: dict = field(default_factory=dict)  # TrainConfig options
    data: str = "teacher"                          # "teacher" (its samples) or "gold"
    teacher_temperature: float | None = None       # the teacher's samples drawn at (None: teacher_data's)
    seeds: tuple | None = None                     # None: the experiment's seeds
    lr: object = TUNE                              # TUNE, a rate, or the group of the arm whose rate it takes


@dataclass(frozen=True)
class Run:
    name: str
    group: str
    seed: int
    overrides: dict   # TrainConfig options, `lr` included
    data: str
    tuning: bool = False
    teacher_temperature: float | None = None


def arms(experiment):
    """The arms: the experiment's `arms` as listed, or else each objective on the experiment's data
    (sft on the teacher's samples is named SeqKD), the oracle, then the HPD sweep (weights, and
    on-policy rollouts)."""
    if experiment.get("arms"):
        return [_listed_arm(experiment, entry) for entry in experiment["arms"]]
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


def _listed_arm(experiment, entry):
    """An arm of the experiment's `arms` list (its keys checked by the schema and `check_arms`)."""
    lr = entry.get("lr", TUNE)
    seeds = entry.get("seeds")
    return Arm(entry["name"], entry["name"], {**entry.get("options", {}), "objective": entry["objective"]},
               entry.get("data", experiment["data"]), entry.get("teacher_temperature"),
               tuple(seeds) if seeds is not None else None, lr)


def check_arms(experiment, source):
    """The rules between an `arms` list's entries: a name and an objective each, distinct names,
    and an `lr` that is a rate, `tune`, or the name of an arm that is tuned or has a rate."""
    from ..specs import fail

    entries = experiment.get("arms") or []
    names = [entry.get("name") for entry in entries]
    for index, entry in enumerate(entries):
        for key in ("name", "objective"):
            if key not in entry:
                fail(source, f"arms[{index}].{key}", "given", None)
        if names.count(entry["name"]) > 1:
            fail(source, f"arms[{index}].name", "distinct from the other arms' names", entry["name"])
        lr = entry.get("lr", TUNE)
        # A name must lead to a rate in one step: an arm that is tuned or has its own rate.
        named = next((other.get("lr", TUNE) for other in entries if other.get("name") == lr), None)
        if not (lr == TUNE or _is_rate(lr) or named == TUNE or _is_rate(named)):
            fail(source, f"arms[{index}].lr", f"'{TUNE}', a rate > 0, or the name of an arm that is tuned or "
                 f"has a rate", lr)


def _is_rate(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def warm_seed(experiment, seed):
    """The seed of the warm student that a run at `seed` starts from: `warm_seed` when set (one
    warm student for every run, the seeds then varying the data order and the sampling only)."""
    return seed if experiment.get("warm_seed") is None else experiment["warm_seed"]


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
        if arm.lr != TUNE:
            continue
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
    steps = experiment["tuning"].get("steps")
    return Run(f"tune-{arm.slug}-lr{lr:g}", arm.group, experiment["tuning"]["seed"],
               {**arm.overrides, "lr": lr, "eval_every": 0, **({"steps": steps} if steps else {})}, arm.data,
               tuning=True, teacher_temperature=arm.teacher_temperature)


def _best_rate(scored):
    """The rate of the best `(score, rate)`, the smaller rate on a tie."""
    return max(scored, key=lambda pair: (pair[0], -pair[1]))[1]


def _validation_score(experiment, out_dir, arm, lr):
    """The primary metric of a finished tuning run on the validation split (None: not finished)."""
    run = _tuning_run(experiment, arm, lr)
    return _read_summary(out_dir, run)["final"][experiment["primary"]["metric"]] if finished(out_dir, run) else None


def main_runs(experiment, selection=None):
    """The paired runs: every arm at each of its seeds, at its learning rate: its own when it has
    one, else its selected one (`selection`: `{group: lr}`), or the one selected for the arm it
    names. Without a selection: the one rate of an untuned `tuning.lr`, else (the tuning not done
    yet) `distill.lr`, a placeholder for planning and checking."""
    selection = selection or {}
    rate = experiment["distill"]["lr"] if tuned(experiment) else experiment["tuning"]["lr"][0]
    by_group = {arm.group: arm for arm in arms(experiment)}

    def lr_of(arm):
        if not isinstance(arm.lr, str):
            return arm.lr
        if arm.lr == TUNE:
            return selection.get(arm.group, rate)
        return lr_of(by_group[arm.lr])

    return [Run(f"{arm.slug}-seed{seed}", arm.group, seed, {**arm.overrides, "lr": lr_of(arm)}, arm.data,
                teacher_temperature=arm.teacher_temperature)
            for arm in arms(experiment) for seed in (arm.seeds if arm.seeds is not None else experiment["seeds"])]


def run_configs(experiment):
    """`{where: options}` of every warm-up and planned run, merged as `warm_student` and `execute`
    merge them; `where` names the run in errors."""
    configs = {}
    warmup = experiment["base"]["student"].get("warmup")
    for run in tuning_runs(experiment) + main_runs(experiment):
        if warmup:
            seed = warm_seed(experiment, run.seed)
            configs[f"student.warmup (seed {seed})"] = {**warmup, "seed": seed}
        configs[f"run {run.name}"] = run_options(experiment, run)
    return configs


def run_options(experiment, run):
    """The `TrainConfig` options of one run: the shared `distill`, the run's own, its seed."""
    return {**experiment["distill"], **run.overrides, "seed": 1000 + run.seed}


def finished(out_dir, run):
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
