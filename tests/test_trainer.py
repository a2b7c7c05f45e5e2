"""The trainer: checkpoints, resume, on-policy batches, metrics, precision, the HF adapter."""

import json
import os

import pytest
import torch

from hpd_kernels.models import DecoderConfig, DecoderLM
from hpd_kernels.training.checkpoint import CheckpointError, load_model, save_model
from hpd_kernels.training.trainer import TrainConfig, train

from toy_training import EOS, VOCAB, toy_examples, toy_model  # noqa: E402,F401


def _examples(n=64, seed=0):
    return toy_examples(n, seed)


_model = toy_model


TIMING = ("tokens_per_s", "step_time_s", "peak_memory_mb")


def _without_timing(history):
    return [{key: value for key, value in record.items() if key not in TIMING} for record in history]


def test_resume_replays_an_interrupted_run_exactly(tmp_path):
    teacher = _model(16, seed=5)
    config = TrainConfig(objective="hpd", steps=7, batch_size=6, lr=1e-2, warmup_steps=2, save_every=2,
                         on_policy_fraction=0.5, max_new_tokens=6, backend="torch", seed=3)
    evaluate = lambda model, step: {"weight_sum": float(sum(p.detach().double().sum() for p in model.parameters()))}  # noqa: E731

    whole = _model(8, seed=1)
    uninterrupted = train(config, whole, teacher, _examples(), eos_id=EOS, evaluate=evaluate,
                          run_dir=str(tmp_path / "whole"), progress=False, log=None)

    interrupted = _model(8, seed=1)
    train(config, interrupted, teacher, _examples(), eos_id=EOS, evaluate=evaluate, run_dir=str(tmp_path / "cut"),
          progress=False, log=None, stop_after=5)  # killed after step 5: the checkpoint is from step 4
    assert json.load(open(tmp_path / "cut" / "latest.json"))["step"] == 4
    assert len(open(tmp_path / "cut" / "metrics.jsonl").readlines()) == 5
    fresh = _model(8, seed=99)  # a new process: other initial weights, to be replaced by the checkpoint
    resumed = train(config, fresh, teacher, _examples(), eos_id=EOS, evaluate=evaluate,
                    run_dir=str(tmp_path / "cut"), progress=False, log=None)

    assert _without_timing(resumed) == _without_timing(uninterrupted)
    for (name, a), (_, b) in zip(whole.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert any(record["on_policy_fraction"] == 1.0 for record in uninterrupted)  # rollouts were exercised
    assert any(record["on_policy_fraction"] == 0.0 for record in uninterrupted)
    lines = [json.loads(line) for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert [line["step"] for line in lines] == list(range(1, 8))  # replayed steps are not duplicated
    saved = {name for _, _, names in os.walk(tmp_path) for name in names}
    assert not any(name.endswith((".pt", ".pth", ".bin", ".pkl")) for name in saved)  # no pickle anywhere


def test_a_run_refuses_a_checkpoint_of_another_config(tmp_path):
    examples = _examples()
    train(TrainConfig(objective="sft", steps=2, batch_size=4), _model(8, 0), None, examples,
          run_dir=str(tmp_path), progress=False, log=None)
    before = {name: open(tmp_path / name, "rb").read() for name in ("metrics.jsonl", "latest.json")}
    with pytest.raises(CheckpointError, match=r"different config \(differs in \['lr'\]\)"):
        train(TrainConfig(objective="sft", steps=2, batch_size=4, lr=1e-4), _model(8, 0), None, examples,
              run_dir=str(tmp_path), progress=False, log=None)
    assert before == {name: open(tmp_path / name, "rb").read() for name in before}


def test_loading_a_checkpoint_of_another_model_names_the_tensor(tmp_path):
    path = str(tmp_path / "small.safetensors")
    save_model(_model(8, 0), path)
    with pytest.raises(CheckpointError, match=r"small.safetensors was saved from another model: tensor 'embed.weight' "
                                              r"has shape \[11, 8\] there and \[11, 16\]"):
        load_model(_model(16, 0), path)
    other = DecoderLM(DecoderConfig(vocab_size=VOCAB, hidden_size=8, num_layers=2, num_heads=2))
    with pytest.raises(CheckpointError, match="it lacks"):
        load_model(other, path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(other, str(tmp_path / "missing.safetensors"))


def test_metrics_cover_what_the_issue_lists(tmp_path):
    teacher = _model(16, seed=5)
    history = train(TrainConfig(objective="hpd", steps=2, batch_size=4, backend="torch"), _model(8, 1), teacher,
                    _examples(), run_dir=str(tmp_path), progress=False, log=None)
    for key in ("loss", "cross_entropy", "entropy", "teacher_entropy", "mismatch_rate", "tokens_per_s",
                "peak_memory_mb", "grad_norm", "lr"):
        assert key in history[-1], key
    assert 0 < history[-1]["entropy"] <= torch.log(torch.tensor(float(VOCAB))).item() + 1e-6


def test_a_bf16_autocast_step_runs_and_tracks_fp32():
    teacher, examples = _model(16, seed=5), _examples()
    runs = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig(objective="hpd", steps=3, batch_size=8, precision=precision, backend="torch")
        runs[precision] = train(config, _model(8, 1), teacher, examples, progress=False, log=None)
    for fp32, bf16 in zip(runs["fp32"], runs["bf16"]):
        # bf16 keeps 8 bits of mantissa: the losses agree to a few percent, not bit for bit.
        assert abs(fp32["loss"] - bf16["loss"]) <= 0.05 * abs(fp32["loss"]) + 1e-3


@pytest.mark.parametrize("family", ["Llama", "Qwen2"])
def test_hf_adapter_runs_a_distillation_step_on_a_tiny_random_model(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    from hpd_kernels.models import HFCausalLM
    from hpd_kernels.sampling import generate

    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64)
    model_class = getattr(transformers, f"{family}ForCausalLM")
    student = HFCausalLM(model_class(config))
    ids = torch.randint(0, VOCAB, (2, 7))
    torch.testing.assert_close(student.lm_head(student(ids)), student.model(ids).logits)
    # Left-padded batched generation equals generating each prompt alone (the KV cache path).
    prompts = [[3, 4, 5, 6], [7]]
    batched = generate(student, prompts, max_new_tokens=4, greedy=True)
    for row, prompt in enumerate(prompts):
        alone = generate(student, [prompt], max_new_tokens=4, greedy=True)
        assert torch.equal(alone.sequences[0, alone.prompt_width:], batched.sequences[row, batched.prompt_width:])
    before = [p.detach().clone() for p in student.parameters()]
    history = train(TrainConfig(objective="hpd", steps=2, batch_size=4, on_policy_fraction=0.5, max_new_tokens=4,
                                backend="torch"), student, _model(16, 5), _examples(), eos_id=EOS,
                    run_dir=str(tmp_path), progress=False, log=None)
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    reloaded = HFCausalLM(model_class(config))
    load_model(reloaded, str(tmp_path / "checkpoint-0000002" / "model.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), reloaded.parameters()))


def test_hf_adapter_takes_soft_capped_models(tmp_path):
    """A Gemma 2 (final soft cap 2) keeps its map: `output_logits` are its own logits, and a
    training step's loss is the library's loss of those logits."""
    transformers = pytest.importorskip("transformers")
    import hpd_kernels
    from hpd_kernels.models import HFCausalLM, output_logits
    from hpd_kernels.training.criteria import shifted_labels
    from hpd_kernels.training.trainer.loss import batch_loss
    from tiny_models import tiny_gemma2

    def gemma(hidden, seed):
        return HFCausalLM(tiny_gemma2(hidden, seed, softcap=2.0, sharpness=20.0, vocab=VOCAB))

    student, teacher = gemma(16, 0), gemma(24, 1)
    assert student.logit_map == (1.0, 2.0)
    ids = torch.randint(3, VOCAB, (2, 7))
    logits = output_logits(student, student(ids))
    torch.testing.assert_close(logits, student.model(ids).logits)
    assert 1.0 < logits.abs().max() <= 2.0
    loss_mask = torch.ones_like(ids)
    loss_mask[:, :2] = 0
    config = TrainConfig(objective="fkl", steps=1, batch_size=2, backend="torch")
    loss, metrics = batch_loss(config, student, teacher, ids, loss_mask, pad_id=0, seed=0)
    with torch.no_grad():
        teacher_logits = output_logits(teacher, teacher(ids))
    labels = shifted_labels(ids, loss_mask)
    expected = hpd_kernels.forward_kl_loss(logits, teacher_logits, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    log_q = torch.log_softmax(logits.double(), -1)[labels != -100]
    entropy = -(log_q.exp() * log_q).sum(-1).mean()
    assert metrics["entropy"] == pytest.approx(entropy.item(), rel=1e-5)
