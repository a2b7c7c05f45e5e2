"""`hpd experiment`: a tiny experiment end to end, its report, and resumption without redoing runs."""

import json
import os

import pytest

from hpd_kernels.cli import main
from hpd_kernels.training.config import ConfigError
from hpd_kernels.training.experiment import load_experiment, main_runs, tuning_runs
from hpd_kernels.training.report import stability

TINY = {
    "objectives": ["sft", "hpd"], "seeds": [0, 1],
    "distill": {"steps": 3, "batch_size": 4, "eval_every": 2, "save_every": 2},
    "tuning": {"lr": [1e-3, 3e-3], "seed": 7, "validation_problems": 6, "extend": 1},
    "sweep": {"on_policy_fraction": [0.5]},
    "eval": {"max_new_tokens": 24, "samples": 2},
    "primary": {"treatment": "hpd", "control": "seqkd"},
    "base": {"task": {"train_problems": 40, "eval_problems": 8},
             "teacher": {"decoder": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
                         "train": {"objective": "sft", "steps": 2, "batch_size": 4}},
             "student": {"decoder": {"hidden_size": 8, "num_layers": 1, "num_heads": 2},
                         "warmup": {"objective": "sft", "steps": 2, "batch_size": 4}}},
}
ARMS = ("seqkd", "hpd", "sft-gold", "hpd-onpolicy0.5")


def _mtimes(folder):
    return {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
            for root, _, names in os.walk(folder) for name in names if name in ("summary.json", "metrics.jsonl")}


def test_tiny_experiment_tunes_runs_reports_and_resumes_without_redoing_runs(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "exp"
    argv = ["experiment", "--config", str(config), "--out", str(out), "--cache-dir", str(tmp_path / "cache")]

    assert main(argv + ["--max-runs", "3", "--workers", "1"]) == 0  # interrupted inside the tuning
    # 8 tuning runs, one more for seqkd (its two rates are done, its best at an end), 8 main runs
    assert "3/17 runs finished" in capsys.readouterr().out
    first = _mtimes(out)
    assert len([name for name in first if name.endswith("summary.json")]) == 3
    assert not (out / "lr_selection.json").exists()

    assert main(argv + ["--workers", "2"]) == 0  # the rest, two at a time in worker processes
    text = capsys.readouterr().out
    # With two rates the best is at an end: each arm's grid grows by one rate (extend=1), 12 + 8 runs.
    assert "20/20 runs finished" in text and "finished tune-seqkd-lr0.001" not in text  # not redone
    after = _mtimes(out)
    assert all(after[name] == stamp for name, stamp in first.items())
    for name in ("results.md", "results.json", "accuracy.png", "entropy.png", "primary.png", "lr_selection.json",
                 "teacher_data.json"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] == results["planned"] == 20
    # Each arm runs at the rate its validation score chose, the smaller on a tie.
    selection = json.loads((out / "lr_selection.json").read_text())
    assert sorted(selection) == sorted(["seqkd", "hpd", "sft on gold (oracle)", "hpd on-policy=0.5"])
    for group, entry in selection.items():
        best = max(entry["validation"].values())
        assert entry["lr"] == min(float(lr) for lr, score in entry["validation"].items() if score == best)
        for run in results["runs"]:
            if run["group"] == group:
                assert run["config"]["lr"] == entry["lr"]
    tuning = {run["name"]: run for run in results["tuning_runs"]}
    assert {run["seed"] for run in tuning.values()} == {7} and len(tuning) == 12
    for arm, group in zip(ARMS, ("seqkd", "hpd", "sft on gold (oracle)", "hpd on-policy=0.5")):
        first = {lr: tuning[f"tune-{arm}-lr{lr:g}"]["final"]["top_p_accuracy"] for lr in (1e-3, 3e-3)}
        extra = 3e-4 if first[1e-3] >= first[3e-3] else 9e-3  # past the better end
        assert sorted(float(lr) for lr in selection[group]["validation"]) == sorted([1e-3, 3e-3, extra]), group
    # The arms' data: the teacher's samples, except the oracle's gold solutions.
    assert {run["group"]: run["data"] for run in results["runs"]} == {
        "seqkd": "teacher", "hpd": "teacher", "sft on gold (oracle)": "gold", "hpd on-policy=0.5": "teacher"}
    table = (out / "results.md").read_text()
    for row in ("| teacher |", "| student before (sft warm-up on gold) | 2 |", "| seqkd | 2 |", "| hpd | 2 |",
                "| sft on gold (oracle) | 2 |", "| hpd on-policy=0.5 | 2 |", "Primary (pre-registered): top_p_accuracy",
                "| hpd - seqkd | 2 |", "Learning rate per arm"):
        assert row in table, row
    primary = results["analysis"]["primary"]["result"]
    by_seed = {(run["group"], run["seed"]): run["final"]["top_p_accuracy"] for run in results["runs"]}
    assert primary["differences"] == [by_seed["hpd", seed] - by_seed["seqkd", seed] for seed in (0, 1)]
    run = results["runs"][0]
    for section, key in (("final", "greedy_accuracy"), ("final", "sampled_accuracy"), ("final", "top_p_accuracy"),
                         ("final", "fkl_to_teacher"), ("final", "rkl_to_teacher"), ("stability", "ce_spikes"),
                         ("stability", "grad_spikes"), ("efficiency", "step_time_ms_mean"), ("curve", "auc")):
        assert run[section][key] is not None, key
    # Same options except the objective and the tuned rate: a fair comparison.
    configs = {r["name"]: r["config"] for r in results["runs"]}
    differing = {key for key in configs["seqkd-seed0"] if configs["seqkd-seed0"][key] != configs["hpd-seed0"][key]}
    assert differing <= {"objective", "lr"}

    assert main(argv) == 0  # a third call has nothing left to run
    assert _mtimes(out) == after


def test_teacher_data_is_cached_and_independent_of_the_thread_count(tmp_path):
    """The distillation set is drawn in one thread from a seeded generator: the same with 1 or 2
    threads in the caller, read back from the cache unchanged, and one response per prompt."""
    import torch

    from hpd_kernels.training.experiment import Context

    experiment = load_experiment_from(tmp_path, TINY)
    threads = torch.get_num_threads()
    drawn = []
    try:
        for count, cache in ((1, "a"), (2, "b"), (2, "b")):
            torch.set_num_threads(count)
            context = Context(experiment, str(tmp_path / cache))
            context.prepare(lambda *_: None)
            temperature = experiment["teacher_data"]["temperature"]
            drawn.append((context.teacher_samples[temperature],
                          context.teacher_data_info[temperature]["samples_sha256"]))
    finally:
        torch.set_num_threads(threads)
    assert drawn[0] == drawn[1] == drawn[2]
    samples = drawn[0][0]
    assert [prompt for prompt, _ in samples] == [prompt for prompt, _ in context.workload.examples]
    gold = [response for _, response in context.workload.examples]
    assert [response for _, response in samples] != gold  # sampled, not copied


def load_experiment_from(tmp_path, config):
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(config))
    return load_experiment(str(path))


def test_the_default_experiment_plans_the_issue_grid():
    experiment = load_experiment()
    assert experiment["data"] == "teacher" and len(experiment["seeds"]) >= 5
    assert experiment["base"]["task"]["eval_problems"] >= 1000 and experiment["base"]["task"]["orders"] == "any"
    assert experiment["base"]["teacher"]["checkpoint"].endswith("addition_any_teacher.safetensors")
    names = [run.name for run in main_runs(experiment)]
    for arm in ("seqkd", "fkl", "rkl", "jsd", "skl", "hpd", "sft-gold", "hpd-onpolicy1"):
        assert [f"{arm}-seed{seed}" in names for seed in range(5)] == [True] * 5, arm
    tuning = tuning_runs(experiment)
    assert len(tuning) == 8 * len(experiment["tuning"]["lr"]) and {run.seed for run in tuning} == {100}
    assert experiment["tuning"]["extend"] >= 1  # an optimum at the grid's edge is looked past
    assert experiment["primary"] == {"metric": "top_p_accuracy", "treatment": "hpd", "control": "fkl", "budget": None}


def test_one_learning_rate_is_no_tuning_and_every_arm_runs_at_it(tmp_path):
    experiment = load_experiment_from(tmp_path, {"tuning": {"lr": [1e-3]}})
    assert tuning_runs(experiment) == [] and {run.overrides["lr"] for run in main_runs(experiment)} == {1e-3}


def test_bad_experiment_configs_name_the_key(tmp_path):
    path = tmp_path / "bad.json"
    for config, pattern in (({"objectivez": []}, "unknown key 'objectivez'"),
                            ({"sweep": {"kl_weight": [1]}}, r"unknown key sweep\.'kl_weight'"),
                            ({"distill": {"objective": "fkl"}}, r"distill\.objective is set per run"),
                            ({"objectives": ["kl"]}, "objective must be one of"),
                            ({"primary": {"control": "tvd"}}, r"primary\.control must be one of the experiment's arms"),
                            ({"tuning": {"lr": []}}, r"tuning\.lr must be a non-empty list"),
                            ({"data": "student"}, r"data must be one of teacher, gold")):
        path.write_text(json.dumps(config))
        with pytest.raises(ConfigError, match=pattern):
            load_experiment(str(path))


def test_paired_difference_and_its_t_interval():
    from scipy import stats

    from hpd_kernels.training.report import area_under_curve, paired_difference, t_quantile_975

    for degrees in list(range(1, 40)) + [60, 200]:
        assert t_quantile_975(degrees) == pytest.approx(stats.t.ppf(0.975, degrees), abs=1.5e-3), degrees
    treatment, control = [0.60, 0.55, 0.70, 0.62, 0.58], [0.50, 0.57, 0.61, 0.60, 0.52]
    result = paired_difference(treatment, control)
    differences = [a - b for a, b in zip(treatment, control)]
    low, high = stats.t.interval(0.95, 4, loc=stats.tmean(differences), scale=stats.sem(differences))
    assert result["mean"] == pytest.approx(sum(differences) / 5)
    assert result["ci95"] == pytest.approx([low, high], abs=1e-4)
    assert result["treatment_better"] == 4 and result["pairs"] == 5
    assert area_under_curve([(0, 0.0), (100, 1.0), (300, 1.0)]) == pytest.approx((50 + 200) / 300)


def test_stability_counts_spikes_against_the_running_median():
    history = [{"loss": 1.0, "cross_entropy": 1.0, "grad_norm": 0.5} for _ in range(60)]
    history[55]["cross_entropy"] = 1.6   # > 1.5 x median: a spike
    history[57]["cross_entropy"] = 1.4   # not
    history[58]["grad_norm"] = 3.0       # > 3 x median: a gradient spike
    history[59]["grad_norm"] = 1.4       # not
    result = stability(history, max_grad_norm=1.0)
    assert result["ce_spikes"] == 1 and result["grad_spikes"] == 1 and result["loss_spikes"] == 0
    assert result["grad_norm_max"] == 3.0 and result["clipped_fraction"] == pytest.approx(2 / 60)
    assert result["grad_norm_p95_over_median"] == pytest.approx(1.0)


@pytest.mark.parametrize("folder", ["experiment", "second_experiment"])
def test_the_report_reproduces_the_committed_experiment(folder):
    """`results.md` from a committed `results.json` (its teacher, warm-up evaluations, run summaries,
    learning-rate selection and the teacher's entropy on its own samples) is the committed
    `results.md`, byte for byte, and so are the JSON table and the comparisons."""
    from hpd_kernels.training.report import analysis, group_statistics
    from hpd_kernels.training.report.writer import report_markdown, teacher_entropies

    folder = os.path.join(os.path.dirname(__file__), "..", "docs", "results", folder)
    with open(os.path.join(folder, "results.json")) as handle:
        results = json.load(handle)
    groups = {}
    for summary in results["runs"]:
        groups.setdefault(summary["group"], []).append(summary)
    teacher_data = [results.get("teacher_data"), *results.get("teacher_data_other_temperatures", {}).values()]
    result = analysis(results["experiment"], groups, teacher_entropy=teacher_entropies(teacher_data))
    assert json.loads(json.dumps(result)) == results["analysis"]
    assert results["finished"] == results["planned"] and len(results["commits"]) == 1
    with open(os.path.join(folder, "results.md")) as handle:
        assert report_markdown(results["experiment"], results["teacher"], results["student_before"], groups, result,
                               results["lr_selection"]) + "\n" == handle.read()
    for group, members in groups.items():
        table = {label: list(value) for label, value in group_statistics(members).items()}
        assert {**table, "seeds": len(members)} == results["table"][group]


def test_the_pinned_teacher_is_its_recipe_and_a_changed_copy_is_refused(tmp_path):
    """The committed teacher records the recipe and sizes that made it (scripts/pin_teacher.py),
    matches its recorded sha256, and a copy with one byte changed is refused before it is loaded."""
    import shutil

    import torch
    from safetensors import safe_open

    from hpd_kernels.training.checkpoint import CheckpointError
    from hpd_kernels.training.experiment import PINNED_TEACHER, TEACHER_DECODER, TEACHER_RECIPE
    from hpd_kernels.training.task import task_tokenizer
    from hpd_kernels.training.workload import build_model

    with safe_open(PINNED_TEACHER, "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["recipe"]) == TEACHER_RECIPE and json.loads(metadata["decoder"]) == TEACHER_DECODER
    assert json.loads(metadata["evaluation"])["greedy_accuracy"] > 0.95
    section = {"decoder": TEACHER_DECODER, "checkpoint": PINNED_TEACHER}
    build_model(section, task_tokenizer(), "teacher", torch.device("cpu"))  # the checksum holds
    copy = tmp_path / "teacher.safetensors"
    shutil.copy(PINNED_TEACHER, copy)
    shutil.copy(PINNED_TEACHER + ".sha256", str(copy) + ".sha256")
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        build_model({**section, "checkpoint": str(copy)}, task_tokenizer(), "teacher", torch.device("cpu"))


def test_a_data_file_sets_its_last_pairs_aside_for_validation(tmp_path):
    from hpd_kernels.training.data import DataError
    from hpd_kernels.training.workload import Workload

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{index}", "response": f"r{index}"}) + "\n" for index in range(20)))
    config = {"data": str(data), "eval_fraction": 0.1, "eval": {"max_new_tokens": 4},
              "teacher": {"decoder": {}}, "student": {"decoder": {}}}
    workload = Workload(config, validation=3)
    assert [problem[0] for problem in workload.validation_problems] == ["p15", "p16", "p17"]
    assert len(workload.examples) == 15 and [problem[0] for problem in workload.eval_problems] == ["p18", "p19"]
    assert workload.scored_on(workload.validation_problems).eval_problems == workload.validation_problems
    with pytest.raises(DataError, match="too few to set 18 aside"):
        Workload(config, validation=18)
