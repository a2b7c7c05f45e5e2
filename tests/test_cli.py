"""The `hpd` command: help, a tiny end-to-end distill, resume, and bad input."""

import json
import os
import subprocess
import sys

import pytest

from hpd_kernels.cli import main

TINY = {
    "task": {"train_problems": 300, "eval_problems": 12},
    "teacher": {"decoder": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
                "train": {"objective": "sft", "steps": 3, "batch_size": 4}},
    "student": {"decoder": {"hidden_size": 8, "num_layers": 1, "num_heads": 2},
                "warmup": {"objective": "sft", "steps": 2, "batch_size": 4}},
    "distill": {"steps": 3, "batch_size": 4, "eval_every": 2, "save_every": 2},
    "eval": {"max_new_tokens": 24},
}


def _write(path, value):
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return str(path)


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _snapshot(folder):
    return {os.path.join(root, name): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_of_every_command_explains_its_options():
    for command, needles in ((["--help"], ["distill", "experiment", "python -m bench"]),
                             (["experiment", "--help"], ["--config", "--out", "--cache-dir", "--device", "--max-runs",
                                                         "objectives", "seeds", "sweep", "fkl_weight", "samples"]),
                             (["distill", "--help"], ["--config", "--out", "--cache-dir", "--objective", "--steps",
                                                      "--on-policy-fraction", "--seed", "--device", "on_policy_fraction",
                                                      "fkl_weight", "precision"])):
        result = subprocess.run([sys.executable, "-m", "hpd_kernels.cli", *command], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        for needle in needles:
            assert needle in result.stdout, (command, needle)


def test_hpd_offers_only_commands_that_run_from_an_installed_package(tmp_path):
    """Every command `hpd` lists runs outside the repository too (where an installed `hpd` runs);
    the benchmark suite (bench/, not packaged) is not one of them: its entry is `python -m bench`,
    from a checkout."""
    from hpd_kernels.cli import build_parser

    commands = next(action.choices for action in build_parser()._actions if action.dest == "command")
    assert sorted(commands) == ["distill", "experiment"]
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "hpd_kernels.cli", command, "--help"], capture_output=True,
                                text=True, timeout=120, cwd=tmp_path)  # bench/ is not importable from here
        assert result.returncode == 0, (command, result.stderr)
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 2
    # python -m hpd_kernels forwards the same commands.
    result = subprocess.run([sys.executable, "-m", "hpd_kernels", "bench"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and "bench" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_benchmark_runs_from_a_checkout_as_python_m_bench():
    result = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    for needle in ("--device", "--quick", "--out"):
        assert needle in result.stdout, needle


def test_tiny_distill_end_to_end_then_resume_without_retraining(tmp_path, capsys):
    config = _write(tmp_path / "tiny.json", TINY)
    argv = ["distill", "--config", config, "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert "training from scratch" in out
    for name in ("results.md", "results.json", "distill.png", "student.safetensors", "distill/metrics.jsonl"):
        assert (tmp_path / "run" / name).exists(), name
    assert "| student after hpd |" in out and "| teacher |" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["evaluations"]) == {"teacher", "student_before", "student_after"}
    metrics = (tmp_path / "run" / "distill" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3]
    assert "eval_greedy_accuracy" in json.loads(metrics[1])  # the periodic evaluation at step 2

    code, out, _ = _run(argv, capsys)  # again: the teacher comes from the cache, the run is complete
    assert code == 0 and "reusing" in out and "continuing" in out
    assert (tmp_path / "run" / "distill" / "metrics.jsonl").read_text().splitlines() == metrics


def test_user_data_with_a_decoder_teacher_and_student(tmp_path, capsys):
    lines = [json.dumps({"prompt": f"{a} plus {b} is ", "response": str(a + b)}) for a in range(6) for b in range(6)]
    data = _write(tmp_path / "train.jsonl", "\n".join(lines) + "\n")
    config = _write(tmp_path / "mine.json", {
        "data": "train.jsonl", "eval_fraction": 0.2,
        "teacher": {"decoder": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
                    "train": {"objective": "sft", "steps": 2, "batch_size": 4}},
        "student": {"decoder": {"hidden_size": 8, "num_layers": 1, "num_heads": 2}},
        "distill": {"objective": "jsd", "steps": 2, "batch_size": 4}, "eval": {"max_new_tokens": 4}})
    assert os.path.exists(data)
    code, out, err = _run(["distill", "--config", config, "--out", str(tmp_path / "run"),
                           "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 0, err
    assert "| student after jsd |" in out


@pytest.mark.parametrize("case", ["unknown_top_key", "unknown_train_option", "malformed_line", "missing_data",
                                  "missing_config", "vocab_too_small", "foreign_checkpoint", "other_run"])
def test_bad_input_gets_a_clear_error_and_nothing_on_disk_changes(tmp_path, capsys, case):
    data = _write(tmp_path / "train.jsonl", '{"prompt": "ab", "response": "ba"}\n' * 10)
    decoder = {"hidden_size": 8, "num_layers": 1, "num_heads": 2}
    base = {"data": "train.jsonl", "teacher": {"decoder": decoder, "train": {"objective": "sft", "steps": 1}},
            "student": {"decoder": decoder}, "distill": {"steps": 1, "batch_size": 2}}
    out_dir = tmp_path / "run"
    expected = {
        "unknown_top_key": ({**base, "optimiser": {}}, r"cfg\.json: unknown key 'optimiser'"),
        "unknown_train_option": ({**base, "distill": {"stepz": 3}}, r"cfg\.json: distill: unknown training option 'stepz'"),
        "malformed_line": (base, r"train\.jsonl line 3: not valid JSON"),
        "missing_data": ({**base, "data": "nowhere.jsonl"}, r"data file .*nowhere\.jsonl does not exist"),
        "missing_config": (None, r"config file .*absent\.json does not exist"),
        "vocab_too_small": ({**base, "student": {"decoder": {**decoder, "vocab_size": 3}}},
                            r"student\.decoder\.vocab_size=3 is smaller than the tokenizer's 4 tokens"),
        "foreign_checkpoint": ({**base, "student": {"decoder": decoder, "checkpoint": "other.safetensors"}},
                               r"other\.safetensors was saved from another model: tensor 'embed\.weight'"),
        "other_run": (base, r"holds a run of another config .*nothing in .* was changed"),
    }
    config, pattern = expected[case]
    if case == "malformed_line":
        _write(tmp_path / "train.jsonl", '{"prompt": "ab", "response": "ba"}\n\n{"prompt": "ab" "response"}\n')
    if case == "foreign_checkpoint":
        from hpd_kernels.models import DecoderConfig, DecoderLM
        from hpd_kernels.training.checkpoint import save_model

        save_model(DecoderLM(DecoderConfig(vocab_size=4, hidden_size=16, num_layers=1, num_heads=2)),
                   str(tmp_path / "other.safetensors"))
    if case == "other_run":  # a finished run of another config is in the output directory
        first = _write(tmp_path / "first.json", base)
        assert main(["distill", "--config", first, "--out", str(out_dir), "--cache-dir", str(tmp_path / "c")]) == 0
        capsys.readouterr()
        config = {**base, "distill": {"steps": 2, "batch_size": 2}}
    path = str(tmp_path / "absent.json") if config is None else _write(tmp_path / "cfg.json", config)
    before = _snapshot(tmp_path)
    code, _, err = _run(["distill", "--config", path, "--out", str(out_dir), "--cache-dir", str(tmp_path / "c")],
                        capsys)
    assert code == 2
    assert __import__("re").search(pattern, err), err
    after = _snapshot(tmp_path)
    assert {name: content for name, content in after.items() if name in before} == before  # nothing overwritten
    assert data


def _save_tiny_llama(folder, chars, hidden, seed):
    """A randomly initialised Llama and a character-level fast tokenizer, saved like a hub model."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{char: index + 3 for index, char in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            bos_token="<s>").save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab) + 2, hidden_size=hidden, intermediate_size=2 * hidden,  # padded rows
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_distill_hugging_face_models_from_a_config_and_refuse_misaligned_vocabularies(tmp_path, capsys):
    pytest.importorskip("transformers")
    chars = "0123456789+= "
    teacher = _save_tiny_llama(str(tmp_path / "teacher"), chars, 16, seed=0)
    student = _save_tiny_llama(str(tmp_path / "student"), chars, 8, seed=1)
    shuffled = _save_tiny_llama(str(tmp_path / "shuffled"), chars[::-1], 8, seed=1)
    lines = [json.dumps({"prompt": f"{a}+{b}=", "response": f" {a + b}"}) for a in range(5) for b in range(5)]
    _write(tmp_path / "train.jsonl", "\n".join(lines))
    config = {"data": "train.jsonl", "eval_fraction": 0.2, "teacher": {"hf": "teacher"}, "student": {"hf": "student"},
              "distill": {"steps": 2, "batch_size": 4, "on_policy_fraction": 0.5}, "eval": {"max_new_tokens": 4}}
    path = _write(tmp_path / "hf.json", config)
    code, out, err = _run(["distill", "--config", path, "--out", str(tmp_path / "run"),
                           "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 0, err
    assert "| student after hpd |" in out
    bad = _write(tmp_path / "bad.json", {**config, "student": {"hf": "shuffled"}})
    code, _, err = _run(["distill", "--config", bad, "--out", str(tmp_path / "run2"),
                         "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 2 and "cannot be aligned" in err and "12 of the student's 16 tokens" in err, err
    assert not (tmp_path / "run2").exists()


def test_hpd_distill_refuses_fsdp_with_a_pointer_to_the_trainer_api(tmp_path, capsys):
    config = _write(tmp_path / "fsdp.json", {**TINY, "distill": {**TINY["distill"], "strategy": "fsdp"}})
    code, _, err = _run(["distill", "--config", config, "--out", str(tmp_path / "run"),
                         "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 2 and "distill.strategy: hpd distill runs DDP under torchrun" in err, err
    assert not (tmp_path / "run").exists()
