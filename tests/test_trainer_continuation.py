"""Continuing training: the constant schedule, another run's optimiser state (`initial_optimizer`),
and sft on tokens drawn from the teacher (`labels="teacher_sample"`)."""

import json
import math

import pytest
import torch

from hpd_kernels.models import output_logits
from hpd_kernels.training import distributed
from hpd_kernels.training.checkpoint import CheckpointError, load_optimizer, save_checkpoint
from hpd_kernels.training.config import load_config
from hpd_kernels.training.criteria import shifted_labels
from hpd_kernels.training.schema import ConfigError
from hpd_kernels.training.trainer import TrainConfig, batch_loss, collate, learning_rate, train
from hpd_kernels.training.trainer import loss as loss_module
from hpd_kernels.training.trainer.loss import teacher_sampled_labels

from toy_training import EOS, VOCAB, toy_examples, toy_model  # noqa: E402


# --- schedule -------------------------------------------------------------------------------------

def test_the_cosine_schedule_is_the_default_and_keeps_its_numbers():
    config = TrainConfig(lr=1.0, warmup_steps=2, steps=10, min_lr_ratio=0.1)
    assert config.schedule == "cosine"
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 6: 0.1 + 0.9 * 0.5, 10: 0.1, 20: 0.1}
    for step, value in expected.items():
        assert learning_rate(config, step) == pytest.approx(value, abs=1e-12), step
    assert learning_rate(config, 4) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 8)))


def test_the_constant_schedule_warms_up_then_holds_lr():
    config = TrainConfig(lr=0.2, warmup_steps=4, steps=10, min_lr_ratio=0.1, schedule="constant")
    assert [learning_rate(config, step) for step in range(4)] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert all(learning_rate(config, step) == 0.2 for step in range(4, 30))  # min_lr_ratio unused
    no_warmup = TrainConfig(lr=0.2, warmup_steps=0, steps=3, schedule="constant")
    assert [learning_rate(no_warmup, step) for step in range(3)] == [0.2, 0.2, 0.2]


def test_a_run_logs_the_constant_learning_rate():
    config = TrainConfig(objective="sft", steps=3, batch_size=2, lr=1e-2, warmup_steps=1, schedule="constant")
    history = train(config, toy_model(8, seed=1), None, toy_examples(8), eos_id=EOS, progress=False, log=None)
    assert [record["lr"] for record in history] == [1e-2, 1e-2, 1e-2]


def test_an_unknown_schedule_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"TrainConfig: schedule must be one of cosine, constant, got \"linear\""):
        TrainConfig(schedule="linear")
    with pytest.raises(ConfigError, match=r"cfg\.json: distill\.schedule must be one of cosine, constant"):
        TrainConfig.from_dict({"schedule": 1}, "cfg.json", "distill")


# --- initial_optimizer ----------------------------------------------------------------------------

def _continuation_config(steps):
    # Constant lr from the first step, and one example (every batch alike, whatever the step): a
    # continued run's steps then see exactly the batches and learning rates of an uninterrupted one.
    return TrainConfig(objective="sft", steps=steps, batch_size=4, lr=2e-2, warmup_steps=0, schedule="constant",
                       weight_decay=0.01, seed=3)


def _weights(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _train(config, student, **options):
    return train(config, student, None, toy_examples(1), eos_id=EOS, progress=False, log=None, **options)


def test_continuing_another_runs_optimizer_has_no_restart_dip(tmp_path):
    first, then = 3, 2
    whole = toy_model(8, seed=1)
    _train(_continuation_config(first + then), whole)

    continued = toy_model(8, seed=1)
    _train(_continuation_config(first), continued, run_dir=str(tmp_path / "a"))
    _train(_continuation_config(then), continued, initial_optimizer=str(tmp_path / "a"))
    for name, tensor in _weights(whole).items():
        assert torch.equal(tensor, continued.state_dict()[name]), name

    # Without the feature (a fresh AdamW: new moments, bias correction from step 1) the weights differ.
    restarted = toy_model(8, seed=1)
    _train(_continuation_config(first), restarted)
    _train(_continuation_config(then), restarted)
    assert any(not torch.equal(tensor, restarted.state_dict()[name]) for name, tensor in _weights(whole).items())


def test_a_checkpoint_folder_also_gives_the_initial_optimizer(tmp_path):
    student = toy_model(8, seed=1)
    _train(_continuation_config(2), student, run_dir=str(tmp_path / "a"))
    folder = tmp_path / "a" / json.load(open(tmp_path / "a" / "latest.json"))["checkpoint"]
    by_folder, by_run = toy_model(8, seed=1), toy_model(8, seed=1)
    for model in (by_folder, by_run):
        model.load_state_dict(student.state_dict())
    _train(_continuation_config(1), by_folder, initial_optimizer=str(folder))
    _train(_continuation_config(1), by_run, initial_optimizer=str(tmp_path / "a"))
    for name, tensor in by_folder.state_dict().items():
        assert torch.equal(tensor, by_run.state_dict()[name]), name


def test_the_loaded_state_is_the_saved_state_and_the_hyperparameters_stay_this_runs(tmp_path):
    model = toy_model(8, seed=1)
    saved = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.5, betas=(0.8, 0.9))
    for _ in range(3):
        saved.zero_grad()
        model(torch.tensor([[3, 4, 5]])).sum().backward()
        saved.step()
    save_checkpoint(str(tmp_path), 3, model, saved, {})
    fresh = torch.optim.AdamW(model.parameters(), lr=7e-3, weight_decay=0.0)
    load_optimizer(str(tmp_path / "checkpoint-0000003"), fresh, state_only=True)
    expected, loaded = saved.state_dict(), fresh.state_dict()
    assert loaded["state"].keys() == expected["state"].keys()
    for index, values in expected["state"].items():
        for key, value in values.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)
    group = loaded["param_groups"][0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (7e-3, 0.0, (0.9, 0.999))


def test_a_run_resuming_its_own_checkpoint_keeps_its_own_optimizer(tmp_path):
    config = TrainConfig(**{**_continuation_config(3).to_dict(), "save_every": 1})
    whole = toy_model(8, seed=1)
    _train(config, whole, run_dir=str(tmp_path / "whole"))
    cut = toy_model(8, seed=1)
    _train(config, cut, run_dir=str(tmp_path / "cut"), stop_after=2)
    # The initial optimizer is not even read: the run's own checkpoint is resumed.
    _train(config, cut, run_dir=str(tmp_path / "cut"), initial_optimizer=str(tmp_path / "no-such-run"))
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, cut.state_dict()[name]), name


def test_an_optimizer_of_other_parameters_is_refused_naming_the_path(tmp_path):
    _train(_continuation_config(1), toy_model(16, seed=1), run_dir=str(tmp_path / "wide"))
    with pytest.raises(CheckpointError, match=r"wide/checkpoint-0000001/optimizer\.safetensors holds optimizer "
                                              r"state for different parameters: .* has shape \[.*16"):
        _train(_continuation_config(1), toy_model(8, seed=1), run_dir=str(tmp_path / "new"),
               initial_optimizer=str(tmp_path / "wide"))
    assert not (tmp_path / "new").exists()  # refused before the run directory was made
    with pytest.raises(CheckpointError, match=r"initial optimizer .*nowhere is neither a checkpoint folder"):
        _train(_continuation_config(1), toy_model(8, seed=1), initial_optimizer=str(tmp_path / "nowhere"))


def test_a_sharded_run_refuses_an_initial_optimizer(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # refused before any process group is needed
    config = TrainConfig(**{**_continuation_config(1).to_dict(), "strategy": "fsdp"})
    with pytest.raises(ValueError, match=r"initial_optimizer is not supported with strategy 'fsdp'"):
        _train(config, toy_model(8, seed=1), initial_optimizer=str(tmp_path))


# --- labels="teacher_sample" -------------------------------------------------------------------------

def _models():
    teacher, student = toy_model(16, seed=5), toy_model(8, seed=1)
    with torch.no_grad():  # sharper than at init, so that teacher, student and data tell apart
        teacher.lm_head.weight.mul_(30)
    return teacher.eval(), student


def _capture_targets(monkeypatch):
    """The labels each sft loss is given, in order."""
    captured, original = [], loss_module.distillation_loss

    def recording(objective, hidden, weight, teacher_hidden, teacher_weight, labels, **options):
        captured.append(labels.clone())
        return original(objective, hidden, weight, teacher_hidden, teacher_weight, labels, **options)

    monkeypatch.setattr(loss_module, "distillation_loss", recording)
    return captured


def _next_token_probabilities(model, input_ids, temperature):
    with torch.no_grad():
        hidden = model(input_ids, attention_mask=torch.ones_like(input_ids))
        return torch.softmax(output_logits(model, hidden).float() / temperature, dim=-1)


def test_the_drawn_tokens_follow_the_teachers_distribution(monkeypatch):
    teacher, student = _models()
    rows, temperature = 3000, 2.0
    prompt, response = toy_examples(1)[0]
    input_ids, loss_mask = collate([(prompt, response)] * rows, 0, "cpu")
    captured = _capture_targets(monkeypatch)
    config = TrainConfig(objective="sft", labels="teacher_sample", temperature=temperature)
    batch_loss(config, student, teacher, input_ids, loss_mask, 0, seed=0, label_seed=11)
    targets, labels = captured[0], shifted_labels(input_ids, loss_mask)
    assert torch.equal(targets == -100, labels == -100)  # the same positions, and only those, are in the loss
    positions = (labels[0] != -100).nonzero().flatten().tolist()
    frequencies = torch.stack([torch.bincount(targets[:, p], minlength=VOCAB).double() / rows for p in positions])
    teacher_q = _next_token_probabilities(teacher, input_ids[:1], temperature)[0, positions].double()
    teacher_at_one = _next_token_probabilities(teacher, input_ids[:1], 1.0)[0, positions].double()
    student_p = _next_token_probabilities(student, input_ids[:1], 1.0)[0, positions].double()
    data = torch.nn.functional.one_hot(labels[0, positions], VOCAB).double()
    # Every (position, token) frequency within 5 standard errors of the teacher's probability at
    # the run's temperature (+ one draw's worth); the data, the student, or the teacher at T = 1 are not.
    def fits(expected):
        tolerance = 5 * (expected * (1 - expected) / rows).sqrt() + 1 / rows
        return bool(((frequencies - expected).abs() <= tolerance).all())

    assert fits(teacher_q)
    for other in (teacher_at_one, student_p, data):
        assert not fits(other)


def test_the_draw_is_seeded_and_the_loss_is_the_students_cross_entropy_on_it(monkeypatch):
    teacher, student = _models()
    examples = toy_examples(8)
    input_ids, loss_mask = collate(examples, 0, "cpu")
    captured = _capture_targets(monkeypatch)
    config = TrainConfig(objective="sft", labels="teacher_sample")
    first, metrics = batch_loss(config, student, teacher, input_ids, loss_mask, 0, seed=0, label_seed=5)
    again, _ = batch_loss(config, student, teacher, input_ids, loss_mask, 0, seed=1, label_seed=5)
    batch_loss(config, student, teacher, input_ids, loss_mask, 0, seed=0, label_seed=6)
    assert torch.equal(captured[0], captured[1]) and float(first.detach()) == float(again.detach())
    assert not torch.equal(captured[0], captured[2])
    labels = shifted_labels(input_ids, loss_mask)
    assert not torch.equal(captured[0], labels)
    with torch.no_grad():
        logits = output_logits(student, student(input_ids, attention_mask=(input_ids != 0).long() | loss_mask))
    on_drawn = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), captured[0].reshape(-1))
    on_data = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
    assert float(first.detach()) == pytest.approx(float(on_drawn), rel=1e-5)
    assert metrics["cross_entropy"] == pytest.approx(float(on_data), rel=1e-5)  # the data's, as every objective
    assert set(metrics) == {"cross_entropy", "entropy", "teacher_entropy"}


def test_the_draw_keeps_masked_positions_and_takes_any_chunk_size():
    teacher_hidden = torch.randn(2, 5, 4)
    labels = torch.tensor([[-100, 3, 4, -100, 5], [6, -100, -100, 7, -100]])
    drawn = teacher_sampled_labels(teacher_hidden, torch.randn(VOCAB, 4), labels, 1.0,
                                   torch.Generator().manual_seed(0), (1.0, None), chunk_rows=2)
    assert torch.equal(drawn == -100, labels == -100)
    assert bool(((drawn[labels != -100] >= 0) & (drawn[labels != -100] < VOCAB)).all())


def test_a_teacher_sample_run_trains_and_logs_the_teachers_entropy():
    teacher, student = _models()
    config = TrainConfig(objective="sft", labels="teacher_sample", steps=2, batch_size=4, grad_accum=2)
    history = train(config, student, teacher, toy_examples(16), eos_id=EOS, progress=False, log=None)
    assert all(math.isfinite(record["loss"]) and "teacher_entropy" in record for record in history)
    with pytest.raises(ValueError, match=r"labels 'teacher_sample' needs a teacher"):
        train(config, student, None, toy_examples(16), eos_id=EOS, progress=False, log=None)


def test_teacher_sample_with_another_objective_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^TrainConfig: labels: teacher_sample replaces the targets of objective "
                                          r"sft, but objective is 'hpd'"):
        TrainConfig(labels="teacher_sample")
    with pytest.raises(ConfigError, match=r"^cfg\.json: distill\.labels: .* objective is 'fkl'"):
        TrainConfig.from_dict({"objective": "fkl", "labels": "teacher_sample"}, "cfg.json", "distill")
    with pytest.raises(ConfigError, match=r"^TrainConfig: labels must be one of data, teacher_sample, got \"model\""):
        TrainConfig(objective="sft", labels="model")
    assert TrainConfig.from_dict({"objective": "sft", "labels": "teacher_sample"}).labels == "teacher_sample"

    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"distill": {"labels": "teacher_sample"}}))  # the default objective: hpd
    with pytest.raises(ConfigError, match=r"cfg\.json: distill\.labels: .* objective is 'hpd'"):
        load_config(str(path))
    path.write_text(json.dumps({"distill": {"objective": "sft", "labels": "teacher_sample"}}))
    assert load_config(str(path))["distill"]["labels"] == "teacher_sample"
    config = load_config()
    path.write_text(json.dumps({"teacher": {**config["teacher"],
                                            "train": {**config["teacher"]["train"], "labels": "teacher_sample"}}}))
    with pytest.raises(ConfigError, match=r"cfg\.json: teacher\.train\.labels must be data \(there is no teacher"):
        load_config(str(path))


def test_a_checkpoint_from_before_the_new_options_resumes_as_their_defaults(tmp_path):
    from hpd_kernels.digests import file_sha256

    config = TrainConfig(**{**_continuation_config(3).to_dict(), "schedule": "cosine", "save_every": 1})
    whole = toy_model(8, seed=1)
    _train(config, whole, run_dir=str(tmp_path / "whole"))
    cut = toy_model(8, seed=1)
    _train(config, cut, run_dir=str(tmp_path / "cut"), stop_after=2)
    latest = json.load(open(tmp_path / "cut" / "latest.json"))
    state_path = tmp_path / "cut" / latest["checkpoint"] / "trainer_state.json"
    state = json.load(open(state_path))
    for key in ("schedule", "labels"):  # as a checkpoint written before these options existed
        del state["config"][key]
    state_path.write_text(json.dumps(state))
    latest["sha256"]["trainer_state.json"] = file_sha256(str(state_path))
    (tmp_path / "cut" / "latest.json").write_text(json.dumps(latest))
    _train(config, cut, run_dir=str(tmp_path / "cut"))
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, cut.state_dict()[name]), name
    refused = TrainConfig(**{**config.to_dict(), "schedule": "constant"})
    with pytest.raises(CheckpointError, match=r"differs in \['schedule'\]"):
        _train(refused, toy_model(8, seed=1), run_dir=str(tmp_path / "cut"))
