"""No pickle is ever loaded (issue 20, item 11): a Hugging Face folder whose weights are pickles only
(`pytorch_model.bin`, written by `torch.save`) is refused with the file named, before transformers
could unpickle it; weights are read from safetensors files only, as the trainer's checkpoints are."""

import json
import os
import re

import pytest
import torch

from hpd_kernels.cli import main

transformers = pytest.importorskip("transformers")

from hpd_kernels.models import HFCausalLM  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hpd_kernels")


def _tiny_llama(folder, keep_safetensors=False, sharded=False):
    """A tiny random Llama saved in `folder` with its weights as a pickle (`torch.save`), as older
    hub models ship them; `keep_safetensors` keeps the safetensors file beside it."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    state = model.state_dict()
    if sharded:  # a sharded pickle: an index and its shard
        torch.save(state, os.path.join(folder, "pytorch_model-00001-of-00001.bin"))
        with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as handle:
            json.dump({"metadata": {}, "weight_map": {name: "pytorch_model-00001-of-00001.bin" for name in state}},
                      handle)
    else:
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    if not keep_safetensors:
        os.remove(os.path.join(folder, "model.safetensors"))
    return str(folder)


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called: a pickle was about to be unpickled")

    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("num_layers", [None, 1])
def test_a_folder_of_pickled_weights_is_refused_naming_the_file(tmp_path, no_unpickling, sharded, num_layers):
    folder = _tiny_llama(tmp_path / "model", sharded=sharded)
    name = "pytorch_model-00001-of-00001.bin" if sharded else "pytorch_model.bin"
    with pytest.raises(ValueError) as caught:
        HFCausalLM.from_pretrained(folder, num_layers=num_layers)
    message = str(caught.value)
    assert message.startswith(f"{os.path.join(folder, name)} holds pickled weights") and "\n" not in message, message
    assert "safetensors" in message and "runs whatever code" in message, message


def test_safetensors_beside_a_pickle_are_what_is_loaded(tmp_path, no_unpickling):
    folder = _tiny_llama(tmp_path / "model", keep_safetensors=True)
    model = HFCausalLM.from_pretrained(folder)
    assert model.vocab_size == 16


def test_asking_for_pickles_is_refused(tmp_path, no_unpickling):
    folder = _tiny_llama(tmp_path / "model", keep_safetensors=True)
    with pytest.raises(ValueError, match=r"use_safetensors=False"):
        HFCausalLM.from_pretrained(folder, use_safetensors=False)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_hpd_distill_refuses_a_pickled_model_in_one_line_before_anything_is_written(tmp_path, capsys, no_unpickling,
                                                                                    role):
    _tiny_llama(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text('{"prompt": "ab", "response": "ba"}\n' * 10)
    decoder = {"decoder": {"hidden_size": 8, "num_layers": 1, "num_heads": 2}}
    config = {"data": "train.jsonl", "teacher": {**decoder, "train": {"objective": "sft", "steps": 1}},
              "student": decoder, "distill": {"steps": 1, "batch_size": 2}, role: {"hf": "model"}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    capsys.readouterr()  # transformers' progress bars while saving the model
    code = main(["distill", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "run"),
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"cfg.json: {role}.hf: {tmp_path / 'model' / 'pytorch_model.bin'} holds pickled weights" in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_the_package_never_unpickles():
    """No module of the package calls torch.load or imports pickle; every model load passes
    use_safetensors=True (HFCausalLM.from_pretrained, the one place that loads weights)."""
    offenders = []
    for root, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                text = open(path).read()
                if re.search(r"torch\.load\(|^\s*(import|from) (pickle|dill|joblib|cloudpickle)\b", text, re.M):
                    offenders.append(path)
    assert not offenders, offenders
