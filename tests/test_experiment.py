"""`hpd experiment`: a tiny experiment end to end, its report, and resumption without redoing runs."""

import json
import os

import pytest

from hpd_kernels.cli import main
from hpd_kernels.training.config import ConfigError
from hpd_kernels.training.experiment import load_experiment, planned_runs
from hpd_kernels.training.report import stability

TINY = {
    "objectives": ["sft", "hpd"], "seeds": [0],
    "distill": {"steps": 3, "batch_size": 4, "eval_every": 2, "save_every": 2},
    "sweep": {"fkl_weight": [2.0], "rkl_weight": [1.0], "on_policy_fraction": [0.5], "seeds": [0]},
    "eval": {"max_new_tokens": 24, "samples": 2},
    "base": {"task": {"train_problems": 200, "eval_problems": 8},
             "teacher": {"decoder": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
                         "train": {"objective": "sft", "steps": 2, "batch_size": 4}},
             "student": {"decoder": {"hidden_size": 8, "num_layers": 1, "num_heads": 2},
                         "warmup": {"objective": "sft", "steps": 2, "batch_size": 4}}},
}


def _mtimes(folder):
    return {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
            for root, _, names in os.walk(folder) for name in names if name in ("summary.json", "metrics.jsonl")}


def test_tiny_experiment_runs_reports_and_resumes_without_redoing_runs(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "exp"
    argv = ["experiment", "--config", str(config), "--out", str(out), "--cache-dir", str(tmp_path / "cache")]

    assert main(argv + ["--max-runs", "1", "--workers", "1"]) == 0  # interrupted after the first run
    assert "1/4 runs finished" in capsys.readouterr().out
    first = _mtimes(out)
    assert len([name for name in first if name.endswith("summary.json")]) == 1

    assert main(argv + ["--workers", "2"]) == 0  # the other three, two at a time in worker processes
    text = capsys.readouterr().out
    assert "4/4 runs finished" in text and "finished sft-seed0" not in text  # the finished run is not redone
    after = _mtimes(out)
    assert all(after[name] == stamp for name, stamp in first.items())
    for name in ("results.md", "results.json", "accuracy.png", "entropy.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "results.md").read_text()
    for row in ("| teacher |", "| student before (sft warm-up) | 1 |", "| sft | 1 |", "| hpd | 1 |",
                "| hpd fkl=2 rkl=1 | 1 |", "| hpd on-policy=0.5 | 1 |"):
        assert row in table, row
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] == results["planned"] == 4
    run = results["runs"][0]
    for section, key in (("final", "greedy_accuracy"), ("final", "sampled_accuracy"), ("final", "fkl_to_teacher"),
                         ("final", "rkl_to_teacher"), ("stability", "ce_spikes"), ("stability", "grad_spikes"),
                         ("efficiency", "step_time_ms_mean"), ("efficiency", "peak_memory_mb")):
        assert key in run[section], key
    # Same objective options except the objective: a fair comparison.
    configs = {r["name"]: r["config"] for r in results["runs"]}
    differing = {key for key in configs["sft-seed0"] if configs["sft-seed0"][key] != configs["hpd-seed0"][key]}
    assert differing == {"objective"}

    assert main(argv) == 0  # a third call has nothing left to run
    assert _mtimes(out) == after


def test_the_default_experiment_plans_the_issue_grid():
    runs = planned_runs(load_experiment())
    names = [name for name, _, _, _ in runs]
    for objective in ("sft", "fkl", "rkl", "jsd", "skl", "hpd"):
        assert [f"{objective}-seed{seed}" in names for seed in (0, 1, 2)] == [True] * 3
    assert "hpd-fkl0.5-rkl2-seed1" in names and "hpd-onpolicy0.5-seed0" in names
    assert "hpd-fkl1-rkl1-seed0" not in names  # that is the main grid's hpd run


def test_bad_experiment_configs_name_the_key(tmp_path):
    path = tmp_path / "bad.json"
    for config, pattern in (({"objectivez": []}, "unknown key 'objectivez'"),
                            ({"sweep": {"kl_weight": [1]}}, r"unknown key sweep\.'kl_weight'"),
                            ({"distill": {"objective": "fkl"}}, r"distill\.objective is set per run"),
                            ({"objectives": ["kl"]}, "objective must be one of")):
        path.write_text(json.dumps(config))
        with pytest.raises(ConfigError, match=pattern):
            load_experiment(str(path))


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


def test_the_report_table_reproduces_the_committed_experiment():
    """`results.md` from the committed `results.json` (its teacher, warm-up evaluations and run
    summaries) is the committed `results.md`, byte for byte, and so is the JSON table."""
    from hpd_kernels.training.report import group_statistics, results_markdown

    folder = os.path.join(os.path.dirname(__file__), "..", "docs", "results", "experiment")
    with open(os.path.join(folder, "results.json")) as handle:
        results = json.load(handle)
    groups = {}
    for summary in results["runs"]:
        groups.setdefault(summary["group"], []).append(summary)
    with open(os.path.join(folder, "results.md")) as handle:
        assert results_markdown(results["teacher"], results["student_before"], groups) + "\n" == handle.read()
    for group, members in groups.items():
        table = {label: list(value) for label, value in group_statistics(members).items()}
        assert {**table, "seeds": len(members)} == results["table"][group]
