"""The second experiment's machinery (`docs/presets/second_experiment.json`): listed arms with their
own seeds, rates and data, one warm student whose optimizer state the runs continue, comparisons at
several budgets with an exact signed-rank test, and each arm's entropy against the teacher's on its
own samples."""

import itertools
import json
import os

import pytest

from hpd_kernels.cli import main
from hpd_kernels.training.config import ConfigError
from hpd_kernels.training.experiment import load_experiment, main_runs, tuning_runs
from hpd_kernels.training.report.measures import verdict, wilcoxon_signed_rank

PRESET = os.path.join(os.path.dirname(__file__), "..", "docs", "presets", "second_experiment.json")


def _enumerated_p(differences):
    """The signed-rank test's two-sided p by listing every sign pattern (mean ranks for ties)."""
    nonzero = [value for value in differences if value != 0]
    magnitudes = sorted(abs(value) for value in nonzero)
    rank = {magnitude: sum(index + 1 for index, other in enumerate(magnitudes) if other == magnitude)
            / magnitudes.count(magnitude) for magnitude in magnitudes}
    observed = sum(rank[abs(value)] for value in nonzero if value > 0)
    totals = [sum(rank[abs(value)] for value, sign in zip(nonzero, signs) if sign)
              for signs in itertools.product((0, 1), repeat=len(nonzero))]
    below = sum(total <= observed + 1e-9 for total in totals) / len(totals)
    above = sum(total >= observed - 1e-9 for total in totals) / len(totals)
    return min(1.0, 2 * min(below, above)), observed


@pytest.mark.parametrize("differences", [
    [0.1, 0.2, 0.3, 0.4, 0.5],                          # 5/5 positive: p = 2/32, the first experiment's case
    [-0.2, 0.05, -0.3, -0.1, 0.4, -0.25, -0.15],
    [0.1, -0.1, 0.2, 0.2, -0.3, 0.0, 0.25, 0.1],        # ties and a zero
    [0.01 * ((-1) ** k) * k for k in range(1, 13)],
])
def test_the_signed_rank_test_is_exact(differences):
    from scipy import stats

    result = wilcoxon_signed_rank(differences)
    p, statistic = _enumerated_p(differences)
    assert result["p"] == pytest.approx(p, abs=1e-12) and result["statistic"] == pytest.approx(statistic)
    if len(set(abs(value) for value in differences)) == len(differences) and 0 not in differences:
        assert result["p"] == pytest.approx(stats.wilcoxon(differences, method="exact").pvalue, abs=1e-12)
    assert wilcoxon_signed_rank([0.1] * 5)["p"] == pytest.approx(2 / 32)
    assert wilcoxon_signed_rank([0.0, 0.0])["p"] is None


def test_the_verdict_needs_both_tests():
    rejects = {"p": 0.01}
    assert verdict({"ci95": [0.01, 0.2], "wilcoxon": rejects}) == "treatment better"
    assert verdict({"ci95": [-0.2, -0.01], "wilcoxon": rejects}) == "treatment worse"
    assert verdict({"ci95": [-0.2, -0.01], "wilcoxon": {"p": 0.0625}}) == "the tests disagree"
    assert verdict({"ci95": [-0.2, 0.01], "wilcoxon": {"p": 0.3}}) == "not distinguishable"


def test_the_preset_plans_what_the_issue_asks():
    experiment = load_experiment(PRESET)
    runs = {run.name: run for run in main_runs(experiment)}
    seeds = {group: sorted(run.seed for run in runs.values() if run.group == group)
             for group in {run.group for run in runs.values()}}
    assert seeds["hpd"] == seeds["fkl"] and len(seeds["hpd"]) >= 15          # the primary pair, paired
    assert experiment["warm_seed"] is not None and experiment["continue_warmup"]  # one warm student, continued
    assert experiment["distill"]["schedule"] == "constant" and experiment["distill"]["warmup_steps"] == 0
    assert experiment["budgets"] == [800, 3200] and experiment["primary"]["budget"] == 800
    assert runs["hpd-seed0"].overrides["steps"] == runs["fkl-seed0"].overrides["steps"] == 3200
    for group in ("hpd-no-yhat", "fkl-1sample", "hpd-noclip", "fkl-noclip", "seqkd-t0.3", "fkl-t0.3", "hpd-t0.3",
                  "hpd-same-lr", "fkl-same-lr", "rkl-same-lr") + tuple(
                      f"hpd-fkl{f:g}-rkl{r:g}" for f in (0.5, 1, 2) for r in (0.5, 1, 2) if (f, r) != (1, 1)):
        assert len(seeds[group]) >= 5 and set(seeds[group]) <= set(seeds["hpd"]), group
    assert runs["hpd-no-yhat-seed0"].overrides["rkl_weight"] == 0
    assert runs["fkl-1sample-seed0"].overrides == {"labels": "teacher_sample", "objective": "sft",
                                                   "lr": experiment["distill"]["lr"]}
    assert runs["hpd-noclip-seed0"].overrides["max_grad_norm"] == 0
    assert {runs[f"{name}-t0.3-seed0"].teacher_temperature for name in ("seqkd", "fkl", "rkl", "hpd")} == {0.3}
    assert {runs[f"{name}-same-lr-seed0"].overrides["lr"] for name in ("hpd", "fkl", "rkl")} == {3e-4}
    tuned = {run.group for run in tuning_runs(experiment)}
    assert tuned == {"hpd", "fkl", "rkl", "seqkd", "hpd-no-yhat", "fkl-1sample"}
    assert {run.overrides["steps"] for run in tuning_runs(experiment)} == {800}


TINY = {
    "seeds": [0, 1],
    "arms": [{"name": "hpd", "objective": "hpd", "options": {"steps": 4}},
             {"name": "fkl", "objective": "fkl", "options": {"steps": 4}},
             {"name": "fkl-1sample", "objective": "sft", "options": {"labels": "teacher_sample"}, "lr": "fkl"},
             {"name": "hpd-cold", "objective": "hpd", "teacher_temperature": 0.3, "lr": 2e-3, "seeds": [1]}],
    "warm_seed": 5, "continue_warmup": True, "budgets": [2],
    "distill": {"steps": 2, "batch_size": 4, "eval_every": 2, "save_every": 2, "warmup_steps": 0,
                "schedule": "constant"},
    "tuning": {"lr": [1e-3, 3e-3], "seed": 7, "validation_problems": 6, "extend": 0, "steps": 2},
    "eval": {"max_new_tokens": 24, "samples": 2},
    "primary": {"treatment": "hpd", "control": "fkl", "budget": 2},
    "comparisons": [{"treatment": "fkl", "control": "fkl-1sample"}],
    "base": {"task": {"train_problems": 40, "eval_problems": 8},
             "teacher": {"decoder": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
                         "train": {"objective": "sft", "steps": 2, "batch_size": 4}},
             "student": {"decoder": {"hidden_size": 8, "num_layers": 1, "num_heads": 2},
                         "warmup": {"objective": "sft", "steps": 2, "batch_size": 4}}},
}


def test_a_tiny_second_experiment_end_to_end(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "exp"
    argv = ["experiment", "--config", str(config), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--workers", "1"]
    assert main(argv) == 0
    # One warm student, at the warm seed, for every run (tuning included).
    assert sorted(name for name in os.listdir(out) if name.startswith("warmup")) == ["warmup-seed5"]
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] == results["planned"] == 4 + 2 * 3 + 1
    runs = {run["name"]: run for run in results["runs"]}
    assert {run["warm_seed"] for run in runs.values()} == {5}
    selection = json.loads((out / "lr_selection.json").read_text())
    assert sorted(selection) == ["fkl", "hpd"]
    assert runs["fkl-1sample-seed0"]["config"]["lr"] == selection["fkl"]["lr"]
    assert runs["hpd-cold-seed1"]["config"]["lr"] == 2e-3 and runs["hpd-cold-seed1"]["teacher_temperature"] == 0.3
    assert runs["hpd-seed0"]["config"]["steps"] == 4 and runs["fkl-1sample-seed0"]["config"]["steps"] == 2
    # The primary comparison is at its budget (step 2 of 4-step runs), from those evaluations.
    primary = results["analysis"]["primary"]["result"]
    at_two = {(run["group"], run["seed"]): next(record["eval_top_p_accuracy"] for record in run["curves"]["eval"]
                                                if record["step"] == 2) for run in runs.values()}
    assert primary["differences"] == [at_two["hpd", seed] - at_two["fkl", seed] for seed in (0, 1)]
    assert "wilcoxon" in primary and "verdict" in primary
    budgets = results["analysis"]["budgets"]
    assert sorted(budgets) == ["2"] and budgets["2"]["comparisons"][0]["control"] == "fkl-1sample"
    # The teacher's entropy on its own samples, per temperature, and each arm held against it.
    cold = json.loads((out / "teacher_data_T0.3.json").read_text())
    warm = json.loads((out / "teacher_data.json").read_text())
    # (an untrained tiny teacher: its samples at T=0.3 and T=1 differ, its entropies barely)
    assert cold["temperature"] == 0.3 and 0 < cold["teacher_entropy"] != warm["teacher_entropy"] > 0
    diversity = results["analysis"]["diversity"]
    assert diversity["hpd-cold"]["teacher_entropy"] == cold["teacher_entropy"]
    assert diversity["hpd"]["teacher_entropy"] == warm["teacher_entropy"]
    text = (out / "results.md").read_text()
    assert "Pre-registered comparisons of top_p_accuracy at each budget" in text and "| 2 | hpd - fkl | 2 |" in text
    assert "Diversity" in text


def test_bad_listed_arms_name_the_key(tmp_path):
    path = tmp_path / "bad.json"
    arm = {"name": "a", "objective": "fkl"}
    for config, pattern in (
            ({"arms": [arm], "objectives": ["fkl"]}, "objectives would not be used"),
            ({"arms": [arm, arm]}, r"arms.*distinct"),
            ({"arms": [{"name": "A b", "objective": "fkl"}]}, r"name must be a name of lower-case"),
            ({"arms": [{"objective": "fkl"}]}, r"arms\[0\]\.name must be given"),
            ({"arms": [{**arm, "lr": "b"}]}, r"arms\[0\]\.lr must be"),
            ({"arms": [{**arm, "lr": -1}]}, r"arms\[0\]\.lr must be"),
            ({"arms": [{**arm, "options": {"objective": "rkl"}}]}, "unknown training option 'objective'"),
            ({"arms": [arm], "primary": {"treatment": "a", "control": "a"}, "budgets": [3]},
             "budgets must be steps at which run a-seed0 evaluates"),
            ({"arms": [arm], "primary": {"treatment": "a", "control": "a"},
              "comparisons": [{"treatment": "a", "control": "z"}]}, r"comparisons\[0\]\.control must be one of"),
            ({"warm_seed": -1}, "warm_seed must be")):
        path.write_text(json.dumps(config))
        with pytest.raises(ConfigError, match=pattern):
            load_experiment(str(path))
