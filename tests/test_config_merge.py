"""Three bugs found by reading the training layer, each pinned here.

- `hpd experiment`'s `base` section is merged like `hpd distill`'s config (one `merge_config`): a
  teacher given as a Hugging Face model replaces the default decoder teacher instead of being
  merged into it (which was refused: "exactly one of 'hf' or 'decoder'"), and relative paths are
  taken relative to the experiment file.
- `hpd experiment` chooses its device as `hpd distill` does: under torchrun, the rank's device.
- An unexpected error on rank 0 inside `_on_main` reaches every rank instead of leaving the others
  waiting in the broadcast.
"""

import json

import pytest
import torch

from hpd_kernels.training import distributed, experiment, pipeline
from hpd_kernels.training.config import load_config
from hpd_kernels.training.experiment import load_experiment


def test_experiment_base_takes_a_hugging_face_teacher_and_paths_relative_to_the_file(tmp_path):
    folder = tmp_path / "configs"
    (folder / "teacher-model").mkdir(parents=True)
    (folder / "data.jsonl").write_text('{"prompt": "1+1=", "response": "2"}\n')
    (folder / "eval.jsonl").write_text('{"prompt": "2+2=", "response": "4"}\n')
    path = folder / "experiment.json"
    path.write_text(json.dumps({"base": {"data": "data.jsonl", "eval_data": "eval.jsonl",
                                         "teacher": {"hf": "teacher-model"}}}))
    base = load_experiment(str(path))["base"]
    assert base["teacher"] == {"hf": str(folder / "teacher-model")}
    assert base["data"] == str(folder / "data.jsonl") and base["eval_data"] == str(folder / "eval.jsonl")
    assert "task" not in base and "decoder" in base["student"]
    # The same file's sections read the same through `hpd distill`'s loader.
    distill_path = folder / "distill.json"
    distill_path.write_text(json.dumps(json.loads(path.read_text())["base"]))
    config = load_config(str(distill_path))
    assert config["teacher"] == base["teacher"] and config["eval_data"] == base["eval_data"]


def test_experiment_device_follows_torchrun(monkeypatch, tmp_path):
    class Stop(Exception):
        pass

    rank_device = torch.device("cpu", 1)
    seen = []

    def fake_build_model(section, tokenizer, role, device, **_):
        seen.append(device)
        raise Stop

    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(distributed, "setup_from_env", lambda: rank_device)
    monkeypatch.setattr(experiment.context, "build_model", fake_build_model)
    plan = load_experiment()
    plan["base"]["task"]["train_problems"] = 10
    with pytest.raises(Stop):
        experiment.run_experiment(plan, str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), log=lambda *_: None)
    assert seen == [rank_device]


def test_an_unexpected_error_on_rank_zero_reaches_every_rank(monkeypatch):
    sent = []

    def broadcast(value):  # what the other ranks would receive
        sent.append(value)
        return value

    monkeypatch.setattr(distributed, "broadcast_object", broadcast)
    monkeypatch.setattr(distributed, "is_main", lambda: True)
    with pytest.raises(ZeroDivisionError):
        pipeline._on_main(lambda: 1 / 0)
    assert sent == [(None, ("RuntimeError", "rank 0 failed: ZeroDivisionError: division by zero"))]

    monkeypatch.setattr(distributed, "is_main", lambda: False)
    monkeypatch.setattr(distributed, "broadcast_object", lambda value: sent[0])
    with pytest.raises(RuntimeError, match="rank 0 failed: ZeroDivisionError"):
        pipeline._on_main(lambda: pytest.fail("only rank 0 works"))
