"""Our losses in TRL's `DistillationTrainer`, on tiny random models (no downloads, the CPU).

For `beta` in {0, 0.5, 1} our `_compute_loss` gives TRL's own `_compute_loss` (its
`_chunked_divergence_loss`), value and gradients, in float32; HPD with a teacher of another hidden
size and vocabulary is the reference's loss of the models' full logits (which checks that hidden state
`k` lines up with completion token `k`); `trainer.train()` runs two steps of on-policy generation and
our loss; a bad objective or option is one error when the trainer is built.
"""

import math
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from hpd_kernels import reference  # noqa: E402
from hpd_kernels.integrations import trl_distillation  # noqa: E402
from hpd_kernels.integrations.trl_distillation import DistillationTrainer, logit_post_processing  # noqa: E402

import tiny_models  # noqa: E402
from tiny_models import VOCAB  # noqa: E402

PROMPT = 4


def tiny_llama(**options):
    """A random one-layer Llama (`tiny_models.tiny_llama`), by this name so a test can replace it."""
    return tiny_models.tiny_llama(layers=1, **options)


def tiny_tokenizer():
    return tiny_models.tiny_tokenizer(padding_side="left")   # TRL left-pads prompts


def make_trainer(tmp_path, teacher_vocab=VOCAB, max_steps=1, loss=None, loss_options=None, **config):
    student, teacher = tiny_llama(), tiny_llama(hidden=48, vocab=teacher_vocab, seed=1, sharpness=30.0)
    prompts = [" ".join(f"t{3 + (7 * i + j) % (VOCAB - 3)}" for j in range(3)) for i in range(8)]
    args = trl.DistillationConfig(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2,
                                  learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1,
                                  save_strategy="no", max_completion_length=4, bf16=False, seed=0, **config)
    return DistillationTrainer(student, teacher, args, train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                               processing_class=tiny_tokenizer(), loss=loss, loss_options=loss_options)


def make_inputs(batch=3, completion=5, seed=5):
    """TRL's micro-batch layout: left-padded prompts, right-padded completions, a tool mask."""
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, VOCAB, (batch, PROMPT), generator=generator)
    completion_ids = torch.randint(3, VOCAB, (batch, completion), generator=generator)
    prompt_mask, completion_mask = torch.ones_like(prompt_ids), torch.ones_like(completion_ids)
    prompt_mask[0, :2], prompt_ids[0, :2] = 0, 0
    completion_mask[-1, -2:], completion_ids[-1, -2:] = 0, 0
    tool_mask = torch.ones_like(completion_ids)
    tool_mask[1, 1:3] = 0   # a tool's output inside the completion: not in the loss
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "tool_mask": tool_mask}


def loss_and_grads(compute, model, inputs, count):
    loss, entropy_sum, n_valid = compute(model, inputs, count)
    loss.backward()
    parameters = (model.lm_head.weight, model.model.layers[0].self_attn.q_proj.weight)
    grads = [parameter.grad.clone() for parameter in parameters]
    model.zero_grad(set_to_none=True)
    return loss.detach(), entropy_sum, n_valid, grads


@pytest.mark.parametrize("beta, temperature, maps", [(0.0, 1.0, False), (0.5, 0.7, False), (1.0, 1.0, False),
                                                     (0.5, 1.0, True)])
def test_compute_loss_equals_trls(tmp_path, beta, temperature, maps):
    """Our _compute_loss gives TRL's, loss, entropy and gradients (lm_head and a backbone weight),
    float32: rtol 1e-5 / atol 1e-6 on the loss and entropy, rtol 1e-4 / atol 1e-6 on the gradients.
    `maps`: a soft-capped student and a scaled teacher (configs both trainers read)."""
    trainer = make_trainer(tmp_path, beta=beta, temperature=temperature)
    assert trainer.objective == {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")
    model, inputs = trainer.model, make_inputs()
    if maps:
        model.config.final_logit_softcapping, trainer.teacher_model.config.logit_scale = 2.0, 0.5
    for count in (None, torch.tensor(23.0)):
        ours = loss_and_grads(trainer._compute_loss, model, inputs, count)
        theirs = loss_and_grads(lambda *a: trl.DistillationTrainer._compute_loss(trainer, *a), model, inputs, count)
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-6)
        assert ours[2].item() == theirs[2].item() == 11   # 15 completion tokens, 2 padded, 2 a tool's
        for mine, trls in zip(ours[3], theirs[3]):
            torch.testing.assert_close(mine, trls, rtol=1e-4, atol=1e-6)


def test_hpd_with_another_vocabulary_is_the_references(tmp_path, monkeypatch):
    """HPD, teacher with a wider vocabulary (TRL refuses it): the reference's HPD of the full logits
    at the positions that predict the completion tokens, with the kernel's y_hat; seeds follow the step."""
    trainer = make_trainer(tmp_path, teacher_vocab=VOCAB + 16, loss="hpd",
                           loss_options={"fkl_weight": 0.7, "ce_weight": 0.3})
    details, hpd = [], trl_distillation.fused_linear_hybrid_kl_loss

    def keep_details(*args, **kwargs):
        result = hpd(*args, **kwargs)
        details.append((result[1], kwargs["seed"]))
        return result

    monkeypatch.setattr(trl_distillation, "fused_linear_hybrid_kl_loss", keep_details)
    model, inputs = trainer.model, make_inputs()
    loss, entropy_sum, n_valid = trainer._compute_loss(model, inputs, None)
    assert loss.shape == () and math.isfinite(loss.item()) and n_valid.item() == 11
    (found, seed), = details
    assert seed == trainer.args.seed   # step 0, first micro-batch
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        student_logits, teacher_logits = (network(input_ids=input_ids, attention_mask=attention_mask).logits
                                          for network in (model, trainer.teacher_model))
    kept = (inputs["completion_mask"] * inputs["tool_mask"]) != 0
    labels = inputs["completion_ids"].masked_fill(~kept, -100)
    assert torch.equal(found.sampled_ids == -100, ~kept)
    # Position PROMPT - 1 + k predicts completion token k.
    expected = reference.hybrid_kl_loss(student_logits[:, PROMPT - 1:-1], teacher_logits[:, PROMPT - 1:-1], labels,
                                        found.sampled_ids, fkl_weight=0.7, reduction="sum")
    expected = expected + 0.3 * torch.nn.functional.cross_entropy(
        student_logits[:, PROMPT - 1:-1].reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(loss, expected / 11, rtol=1e-5, atol=1e-6)
    entropy = reference.student_entropy(student_logits[:, PROMPT - 1:-1], teacher_logits[:, PROMPT - 1:-1])
    torch.testing.assert_close(entropy_sum, entropy[kept].sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["skew_forward_kl", "tvd"])
def test_divergences_with_another_vocabulary(tmp_path, loss):
    trainer = make_trainer(tmp_path, teacher_vocab=VOCAB + 16, loss=loss)
    loss, entropy_sum, n_valid = trainer._compute_loss(trainer.model, make_inputs(), torch.tensor(11.0))
    assert loss.shape == () and math.isfinite(loss.item()) and loss.requires_grad and n_valid.item() == 11
    loss.backward()
    assert torch.isfinite(trainer.model.lm_head.weight.grad).all()


def test_train_steps_on_the_cpu(tmp_path):
    """Two steps of TRL's loop (on-policy generation by transformers) with HPD as the loss."""
    trainer = make_trainer(tmp_path, teacher_vocab=VOCAB + 16, max_steps=2, loss="hpd")
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    assert all(math.isfinite(entry["loss"]) and entry["entropy"] > 0 for entry in logged)
    # HPD's mismatch rate and its data cross-entropy, from the loss's own passes, beside TRL's entropy.
    assert all(0 <= entry["mismatch_rate"] <= 1 and entry["cross_entropy"] > 0 for entry in logged)


@pytest.mark.parametrize("loss, options, message", [
    ("kl", None, "objective must be one of"),
    ("jsd", {"gamma": 1.0}, "'gamma', which is not an option"),
    ("jsd", {"alpha": 0.2}, "alpha is not an option of objective 'jsd'"),
    ("hpd", {"fkl_weight": float("inf")}, "fkl_weight must be a finite number"),
])
def test_bad_objective_is_one_error_at_construction(tmp_path, loss, options, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, loss=loss, loss_options=options)


def test_unreadable_soft_cap_is_one_error_at_construction(tmp_path, monkeypatch):
    original = tiny_llama

    def capped(*args, **kwargs):
        model = original(*args, **kwargs)
        model.config.final_logit_softcapping = float("nan")
        return model

    monkeypatch.setattr(sys.modules[__name__], "tiny_llama", capped)
    with pytest.raises(ValueError, match="final_logit_softcapping=nan"):
        make_trainer(tmp_path)


def test_logit_post_processing_reads_configs_as_trl():
    def config(**fields):
        return transformers.LlamaConfig(vocab_size=8, hidden_size=8, num_attention_heads=2, **fields)

    assert logit_post_processing(config()) == (1.0, None)
    assert logit_post_processing(config(logit_scale=0.5, final_logit_softcapping=30.0)) == (0.5, 30.0)
    assert logit_post_processing(config(lm_head_multiplier=2.0)) == (2.0, None)
    assert logit_post_processing(config(logits_scaling=4.0)) == (0.25, None)
    hyperclovax = config(logits_scaling=4.0)
    hyperclovax.model_type = "hyperclovax"
    assert logit_post_processing(hyperclovax) == (4.0, None)
