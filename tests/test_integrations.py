"""The trainer integrations: Hugging Face `Trainer` and TRL's `GKDTrainer` on tiny random models.

The losses through the integrations (hidden states + lm_head, fused-linear) equal the same losses
computed by hand from the models' full logits; TRL's `generalized_jsd_loss` is matched value for
value and gradient for gradient; a few training steps of each trainer lower the loss. Everything is
built here (no downloads) and runs in seconds on the CPU.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

import hpd_kernels  # noqa: E402
from hpd_kernels.integrations import hf as hf_integration  # noqa: E402
from hpd_kernels.integrations import trl as trl_integration  # noqa: E402

try:
    from trl.experimental.gkd import GKDConfig
    from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer
except ImportError:
    from trl import GKDConfig
    from trl import GKDTrainer as TRLGKDTrainer

VOCAB = 64


def tiny_llama(hidden=32, layers=2, vocab=VOCAB, seed=0, sharpness=1.0):
    """A random Llama; `sharpness` scales its lm_head (a random teacher at 0.02 init is near uniform)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model


@pytest.fixture
def models():
    return tiny_llama(), tiny_llama(hidden=48, seed=1, sharpness=30.0)


def make_batch(batch=3, seq=12, prompt=4, seed=5):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, -3:] = 0                 # a right-padded row
    input_ids[-1, -3:] = 0
    labels = input_ids.clone()
    labels[:, :prompt] = -100                   # prompt tokens
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def teacher_samples(teacher, batch=16, prompt=4, seq=12, seed=7):
    """Sequences drawn from the teacher after random prompts (the prompts are not in the loss)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, prompt), generator=generator)
    with torch.no_grad():
        for _ in range(seq - prompt):
            probs = teacher(input_ids).logits[:, -1].softmax(-1)
            input_ids = torch.cat([input_ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def full_logits(model, inputs):
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def student_grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def zero_grads(model):
    for p in model.parameters():
        p.grad = None


def assert_grads_close(a, b, rtol=1e-4, atol=1e-6):
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# Hugging Face Trainer
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective, options, by_hand", [
    ("hpd", dict(seed=3, fkl_weight=1.0, rkl_weight=0.5),
     lambda s, t, y: hpd_kernels.hybrid_kl_loss(s, t, y, seed=3, fkl_weight=1.0, rkl_weight=0.5)),
    ("jsd", dict(beta=0.3, temperature=2.0),
     lambda s, t, y: hpd_kernels.generalized_jsd_loss(s, t, y, beta=0.3, temperature=2.0)),
    ("rkl", {}, lambda s, t, y: hpd_kernels.reverse_kl_loss(s, t, y)),
    ("fkl", dict(ce_weight=0.4), lambda s, t, y: hpd_kernels.forward_kl_loss(s, t, y) + 0.4 * torch.nn.functional.cross_entropy(
        s.flatten(0, 1), y.flatten(), ignore_index=-100)),
])
def test_hf_loss_equals_loss_on_full_logits(models, objective, options, by_hand):
    student, teacher = models
    inputs = make_batch()
    loss = hf_integration.distillation_loss(student, teacher, inputs, objective=objective, **options)
    loss.backward()
    ours = student_grads(student)
    zero_grads(student)

    with torch.no_grad():
        teacher_logits = full_logits(teacher, inputs)
    reference = by_hand(full_logits(student, inputs)[:, :-1], teacher_logits[:, :-1], inputs["labels"][:, 1:])
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert_grads_close(ours, student_grads(student))
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_hf_loss_num_items_in_batch_and_accumulation(models):
    """Each micro-batch divided by the accumulated batch's tokens sums to the whole batch's mean."""
    student, teacher = models
    inputs = make_batch(batch=4)
    active = int((inputs["labels"][:, 1:] != -100).sum())
    whole = hf_integration.distillation_loss(student, teacher, inputs, objective="fkl")
    halves = [{key: value[rows] for key, value in inputs.items()} for rows in (slice(0, 2), slice(2, 4))]
    parts = [hf_integration.distillation_loss(student, teacher, half, objective="fkl",
                                              num_items_in_batch=torch.tensor(active)) for half in halves]
    torch.testing.assert_close(sum(parts), whole, rtol=1e-5, atol=1e-6)
    summed = hf_integration.distillation_loss(student, teacher, inputs, objective="fkl", reduction="sum")
    doubled = hf_integration.distillation_loss(student, teacher, inputs, objective="fkl", num_items_in_batch=2 * active)
    torch.testing.assert_close(doubled, summed / (2 * active))


def test_hf_teacher_with_a_padded_vocabulary():
    student, teacher = tiny_llama(), tiny_llama(hidden=48, vocab=VOCAB + 8, seed=1, sharpness=30.0)
    inputs = make_batch()
    loss = hf_integration.distillation_loss(student, teacher, inputs, objective="tvd")
    with torch.no_grad():
        reference = hpd_kernels.tvd_loss(full_logits(student, inputs)[:, :-1], full_logits(teacher, inputs)[:, :-1],
                                         inputs["labels"][:, 1:])
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


def test_hf_refuses_logit_transforms_and_unknown_objectives(models):
    student, teacher = models
    with pytest.raises(ValueError, match="objective"):
        hf_integration.distillation_loss(student, teacher, make_batch(), objective="kl")
    teacher.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        hf_integration.distillation_loss(student, teacher, make_batch(), objective="fkl")


def test_hf_forward_keeps_one_position_of_logits(models):
    """The student's forward computes the last position's logits only, never [tokens, vocab]."""
    student, _ = models
    hidden, outputs = hf_integration.final_hidden_states(student, {"input_ids": make_batch()["input_ids"]})
    assert outputs.logits.shape[1] == 1 and hidden.shape == (3, 12, 32)


class Rows(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, index):
        return {key: value[index] for key, value in self.batch.items()}


@pytest.mark.parametrize("objective", ["forward_kl", "hpd"])
def test_hf_trainer_run_lowers_the_distillation_loss(models, tmp_path, objective):
    student, teacher = models
    data = teacher_samples(teacher)

    def distillation_loss():   # the objective's own loss on the whole data (HPD: a fixed draw)
        with torch.no_grad():
            return hf_integration.distillation_loss(student, teacher, data, objective=objective, seed=0).item()

    before = distillation_loss()
    seen = []

    class Spy(hf_integration.DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen.append(num_items_in_batch)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = Spy(model=student, teacher_model=teacher, args=args, train_dataset=Rows(data), objective=objective,
                  seed=0, temperature=1.0)
    trainer.train()
    after = distillation_loss()
    assert after < 0.9 * before, (before, after)
    # The Trainer counted the shifted labels of each accumulated batch: 2 micro-batches of 4 rows of
    # 8 predicted tokens.
    assert len(seen) == 12 and all(int(n) == 2 * 4 * 8 for n in seen)
    assert trainer.loss_is_scaled_for_ga
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    # Evaluation: one batch of 4 rows, the mean over its tokens.
    first_rows = {key: value[:4] for key, value in data.items()}
    trainer.args.per_device_eval_batch_size = 4
    evaluated = trainer.evaluate(eval_dataset=Rows(first_rows))["eval_loss"]
    with torch.no_grad():
        expected = hf_integration.distillation_loss(student, teacher, first_rows, objective=objective, seed=0)
    if objective == "forward_kl":   # HPD's draw in evaluation comes from the trainer's seed sequence
        assert evaluated == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# TRL's GKD
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "num_items"])
def test_trl_generalized_jsd_loss_matches_trl(dtype, beta, temperature, masked, reduction):
    generator = torch.Generator().manual_seed(11)
    student = (3 * torch.randn(3, 7, 40, generator=generator, dtype=dtype)).requires_grad_()
    teacher = 3 * torch.randn(3, 7, 40, generator=generator, dtype=dtype)
    labels = None
    if masked:
        labels = torch.randint(0, 40, (3, 7), generator=generator)
        labels[0, :3] = -100
        labels[2] = -100
    kwargs = dict(labels=labels, beta=beta, temperature=temperature)
    if reduction == "num_items":
        kwargs["num_items_in_batch"] = torch.tensor(25)
    else:
        kwargs["reduction"] = reduction

    ours = trl_integration.generalized_jsd_loss(student, teacher, **kwargs)
    (grad_ours,) = torch.autograd.grad(ours, student)
    theirs = TRLGKDTrainer.generalized_jsd_loss(student, teacher, **kwargs)
    (grad_theirs,) = torch.autograd.grad(theirs, student)
    tolerance = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(ours.to(dtype), theirs, **tolerance)
    torch.testing.assert_close(grad_ours, grad_theirs, **tolerance)


def test_trl_generalized_jsd_loss_edge_cases():
    student, teacher = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    all_masked = torch.full((2, 3), -100)
    assert trl_integration.generalized_jsd_loss(student, teacher, all_masked).item() == 0.0   # TRL: clamp_min(1)
    with pytest.raises(ValueError, match="none"):
        trl_integration.generalized_jsd_loss(student, teacher, reduction="none")
    assert TRLGKDTrainer.generalized_jsd_loss(student, teacher, all_masked).item() == 0.0


def tiny_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def gkd_collator(examples):
    batch = {key: torch.stack([torch.as_tensor(example[key]) for example in examples])
             for key in ("input_ids", "attention_mask", "labels")}
    batch["prompts"] = batch["input_ids"][:, :4]
    batch["prompt_attention_mask"] = batch["attention_mask"][:, :4]
    return batch


def make_gkd_trainer(models, tmp_path, data, trainer_class, max_steps=1, **config):
    student, teacher = models
    from datasets import Dataset
    dataset = Dataset.from_dict({key: value.tolist() for key, value in data.items()})
    args = GKDConfig(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1,
                     save_strategy="no", lmbda=0.0, seq_kd=False, max_new_tokens=4, seed=0, **config)
    return trainer_class(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                         data_collator=gkd_collator, processing_class=tiny_tokenizer())


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_compute_loss_equals_trls(models, tmp_path, beta):
    """The fused-linear compute_loss gives TRL's loss of the full logits, values and gradients."""
    # float32 throughout (GKDConfig's default bf16=True would run the reference's teacher logits in bf16).
    trainer = make_gkd_trainer(models, tmp_path, make_batch(batch=4), trl_integration.GKDTrainer, beta=beta,
                               bf16=False)
    model, inputs = trainer.model, make_batch()
    for count in (None, torch.tensor(17)):
        loss = trainer.compute_loss(model, inputs, num_items_in_batch=count)
        loss.backward()
        ours = student_grads(model)
        zero_grads(model)
        with torch.no_grad():
            teacher_logits = full_logits(trainer.teacher_model, inputs)
        reference = TRLGKDTrainer.generalized_jsd_loss(full_logits(model, inputs)[:, :-1], teacher_logits[:, :-1],
                                                       inputs["labels"][:, 1:], beta=beta, num_items_in_batch=count)
        reference.backward()
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
        assert_grads_close(ours, student_grads(model))
        zero_grads(model)
        # TRL's own compute_loss (full logits) with our static function agrees as well.
        trainer.fused_linear = False
        torch.testing.assert_close(trainer.compute_loss(model, inputs, num_items_in_batch=count), reference,
                                   rtol=1e-5, atol=1e-6)
        trainer.fused_linear = True


def test_gkd_run_with_the_drop_in_lowers_the_loss(models, tmp_path):
    data = teacher_samples(models[1])
    trainer = make_gkd_trainer(models, tmp_path, data, trl_integration.GKDTrainer, max_steps=6, beta=0.5)
    model = trainer.model

    def jsd():
        with torch.no_grad():
            return trainer.compute_loss(model, data).item()

    before = jsd()
    trainer.train()   # GKDConfig's default bf16=True: the fused-linear loss runs under bf16 autocast
    assert jsd() < 0.9 * before
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6
