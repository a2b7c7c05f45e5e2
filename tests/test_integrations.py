"""The trainer integrations: Hugging Face `Trainer` and TRL's `GKDTrainer` on tiny random models.

The losses through the integrations (hidden states + lm_head, fused-linear) equal the same losses
computed by hand from the models' full logits; TRL's `generalized_jsd_loss` is matched value for
value and gradient for gradient; a few training steps of each trainer lower the loss. Everything is
built here (no downloads) and runs in seconds on the CPU.
"""

import functools

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

from tiny_models import VOCAB, tiny_gemma2, tiny_llama, tiny_tokenizer  # noqa: E402


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


def test_hf_refuses_unknown_objectives_and_unreadable_caps(models):
    student, teacher = models
    with pytest.raises(ValueError, match="objective"):
        hf_integration.distillation_loss(student, teacher, make_batch(), objective="kl")
    teacher.config.final_logit_softcapping = "30"
    with pytest.raises(ValueError, match="final_logit_softcapping='30'"):
        hf_integration.distillation_loss(student, teacher, make_batch(), objective="fkl")
    teacher.config.final_logit_softcapping = None
    student.config.logit_scale = 0.0
    with pytest.raises(ValueError, match="logit_scale=0.0"):
        hf_integration.distillation_loss(student, teacher, make_batch(), objective="fkl")


@pytest.mark.parametrize("objective", ["fkl", "jsd", "hpd"])
def test_hf_soft_capped_models_equal_their_own_logits(objective):
    """Gemma 2's final soft-capping, read from each config (caps 3 and 30), applied inside the loss:
    the value and the student's gradients equal the loss of the models' own soft-capped logits."""
    student, teacher = tiny_gemma2(32, 0, softcap=3.0, sharpness=10.0), tiny_gemma2(48, 1, softcap=30.0,
                                                                                       sharpness=60.0)
    inputs = make_batch()
    options = dict(seed=3) if objective == "hpd" else {}
    loss = hf_integration.distillation_loss(student, teacher, inputs, objective=objective, **options)
    loss.backward()
    ours = student_grads(student)
    student.zero_grad()
    logits = full_logits(student, inputs)[:, :-1]
    assert 2.0 < logits.abs().max() <= 3.0   # the model's own logits are capped, and the cap is felt
    with torch.no_grad():
        teacher_logits = full_logits(teacher, inputs)[:, :-1]
    labels = inputs["labels"][:, 1:]
    if objective == "hpd":
        # The same draw: y_hat from the same seed on the same (mapped) student distribution.
        _, details = hpd_kernels.fused_linear_hybrid_kl_loss(
            *_hidden_and_head(student, inputs), *_hidden_and_head(teacher, inputs), labels, seed=3,
            student_softcap=3.0, teacher_softcap=30.0, return_details=True)
        expected = hpd_kernels.hybrid_kl_loss(logits, teacher_logits, labels, sampled_ids=details.sampled_ids)
    else:
        name = {"fkl": "forward_kl", "jsd": "jsd"}[objective]
        expected = hpd_kernels.DIVERGENCE_LOSSES[name](logits, teacher_logits, labels)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(ours, student_grads(student)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _hidden_and_head(model, inputs):
    with torch.no_grad():
        hidden, _ = hf_integration.final_hidden_states(model, {key: value for key, value in inputs.items()
                                                               if key != "labels"})
    return hidden[:, :-1], hf_integration.lm_head_of(model)[0]


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

    seed = {"seed": 0} if objective == "hpd" else {}   # HPD's option only

    def distillation_loss():   # the objective's own loss on the whole data (HPD: a fixed draw)
        with torch.no_grad():
            return hf_integration.distillation_loss(student, teacher, data, objective=objective, **seed).item()

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
                  temperature=1.0, **seed)
    trainer.train()
    after = distillation_loss()
    assert after < 0.9 * before, (before, after)
    # The Trainer counted the shifted labels of each accumulated batch: 2 micro-batches of 4 rows of
    # 8 predicted tokens.
    assert len(seen) == 12 and all(int(n) == 2 * 4 * 8 for n in seen)
    assert trainer.loss_is_scaled_for_ga
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    # Evaluation: one batch of 4 rows, the mean over its tokens (HPD: evaluation's first batch draws with `seed`).
    first_rows = {key: value[:4] for key, value in data.items()}
    trainer.args.per_device_eval_batch_size = 4
    evaluated = trainer.evaluate(eval_dataset=Rows(first_rows))["eval_loss"]
    with torch.no_grad():
        expected = hf_integration.distillation_loss(student, teacher, first_rows, objective=objective, **seed)
    assert evaluated == pytest.approx(expected.item(), rel=1e-5)
    # Each log holds the metrics the loss reported from its own passes, the evaluation's prefixed.
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["entropy"] > 0 and entry["cross_entropy"] > 0 for entry in logged)
    assert all(("mismatch_rate" in entry) == (objective == "hpd") for entry in logged)
    report = {}
    with torch.no_grad():
        hf_integration.distillation_loss(student, teacher, first_rows, objective=objective, report=report, **seed)
    evaluation = trainer.state.log_history[-1]
    assert evaluation["eval_entropy"] == pytest.approx(report["entropy"].item(), rel=1e-5)
    assert evaluation["eval_cross_entropy"] == pytest.approx(report["cross_entropy"].item(), rel=1e-5)


def test_hf_reported_metrics_equal_their_definitions(models):
    """`report`: the student's entropy and the data's cross-entropy, means over the tokens in the loss,
    from the loss's own passes, equal to those of the full logits."""
    student, teacher = models
    inputs, report = make_batch(), {}
    with torch.no_grad():
        hf_integration.distillation_loss(student, teacher, inputs, objective="hpd", seed=1, report=report,
                                         num_items_in_batch=100)
        log_q = torch.log_softmax(full_logits(student, inputs)[:, :-1].double(), dim=-1)
    labels = inputs["labels"][:, 1:]
    active = labels != -100
    entropy = -(log_q.exp() * log_q).sum(-1)[active].mean()
    cross_entropy = -log_q.gather(-1, labels.clamp(min=0)[..., None])[..., 0][active].mean()
    torch.testing.assert_close(report["entropy"].double(), entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(report["cross_entropy"].double(), cross_entropy, rtol=1e-5, atol=1e-6)
    assert 0 <= report["mismatch_rate"].item() <= 1


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


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_compute_loss_equals_trls(models, tmp_path, beta, family):
    """The fused-linear compute_loss gives TRL's loss of the full logits, values and gradients (Gemma 2:
    of its soft-capped logits, the caps read from the configs)."""
    if family == "gemma2":
        models = tiny_gemma2(32, 0, softcap=3.0, sharpness=10.0), tiny_gemma2(48, 1, softcap=30.0, sharpness=60.0)
    # float32 throughout (GKDConfig's default bf16=True would run the reference's teacher logits in bf16).
    trainer = make_gkd_trainer(models, tmp_path, make_batch(batch=4), trl_integration.GKDTrainer, beta=beta,
                               bf16=False)
    model, inputs = trainer.model, make_batch()
    with pytest.raises(ValueError, match="no labels"):
        trainer.compute_loss(model, {key: value for key, value in inputs.items() if key != "labels"})
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


# ----------------------------------------------------------------------------------------------
# What the integrations refuse or keep apart (issue 20)
# ----------------------------------------------------------------------------------------------

def lora(model, target_modules):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_hf_refuses_a_lora_adapter_on_the_lm_head(models, which):
    """An adapter on the output layer changes its output, which lm_head.weight does not show: refused by name."""
    student, teacher = models
    if which == "student":
        student = lora(student, ["q_proj", "lm_head"])
    else:
        teacher = lora(teacher, ["lm_head"])
    with pytest.raises(ValueError, match="LoRA.*lm_head|lm_head.*LoRA"):
        hf_integration.distillation_loss(student, teacher, make_batch(), objective="fkl")


def test_hf_lora_away_from_the_lm_head_trains_its_adapters(models):
    """LoRA on the attention only: the loss is the full logits' loss and the gradient reaches lora_A/lora_B."""
    student, teacher = lora(models[0], ["q_proj", "v_proj"]), models[1]
    for name, parameter in student.named_parameters():
        if "lora_B" in name:   # B = 0 at init would hide the adapter from the loss
            torch.nn.init.normal_(parameter, std=0.2)
    inputs = make_batch()
    loss = hf_integration.distillation_loss(student, teacher, inputs, objective="jsd", beta=0.3)
    loss.backward()
    ours = student_grads(student)
    zero_grads(student)
    with torch.no_grad():
        teacher_logits = full_logits(teacher, inputs)
    reference = hpd_kernels.generalized_jsd_loss(full_logits(student, inputs)[:, :-1], teacher_logits[:, :-1],
                                                 inputs["labels"][:, 1:], beta=0.3)
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    names = [name for name, parameter in student.named_parameters() if parameter.grad is not None]
    assert any("lora_A" in name for name in names) and any("lora_B" in name for name in names)
    assert_grads_close(ours, student_grads(student))


class ScaledHead(torch.nn.Linear):
    def forward(self, hidden):
        return 2.0 * super().forward(hidden)


def test_hf_refuses_an_lm_head_that_is_not_a_plain_linear(models):
    """Any head whose output is not F.linear(hidden, weight, bias) (another forward, a forward hook)."""
    student, teacher = models
    scaled = ScaledHead(32, VOCAB, bias=False)
    scaled.weight = student.lm_head.weight
    student.lm_head = scaled
    with pytest.raises(ValueError, match="ScaledHead"):
        hf_integration.distillation_loss(student, teacher, make_batch(), objective="fkl")
    student, teacher = tiny_llama(), tiny_llama(hidden=48, seed=1)
    hook = student.lm_head.register_forward_hook(lambda module, args, output: output / 2)
    with pytest.raises(ValueError, match="forward hook"):
        hf_integration.distillation_loss(student, teacher, make_batch(), objective="fkl")
    hook.remove()
    student.lm_head.forward = lambda hidden: torch.nn.functional.linear(hidden, student.lm_head.weight) / 2
    with pytest.raises(ValueError, match="forward replaced"):
        hf_integration.distillation_loss(student, teacher, make_batch(), objective="fkl")


def test_hf_lm_head_placed_by_accelerate_is_served(models):
    """accelerate's device placement (a device_map across devices) replaces the forward but computes the layer."""
    hooks = pytest.importorskip("accelerate.hooks")
    student, teacher = models
    inputs = make_batch()
    plain = hf_integration.distillation_loss(student, teacher, inputs, objective="rkl")
    hooks.add_hook_to_module(student.lm_head, hooks.AlignDevicesHook(execution_device="cpu", io_same_device=True))
    torch.testing.assert_close(hf_integration.distillation_loss(student, teacher, inputs, objective="rkl"), plain)


def hpd_trainer(output_dir, data, seed, **arguments):
    """A DistillationTrainer on fresh tiny models (the same weights every call), HPD, evaluation every 2 steps."""
    student, teacher = tiny_llama(), tiny_llama(hidden=48, seed=1, sharpness=30.0)
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        per_device_eval_batch_size=2, learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        **arguments)
    return hf_integration.DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                              train_dataset=Rows(data), eval_dataset=Rows(data), objective="hpd",
                                              seed=seed)


@pytest.mark.parametrize("seed", [0, None])
def test_hf_trainer_resumed_with_evaluation_is_bit_identical(tmp_path, seed):
    """Evaluation takes no draw from training's seeds or generator, so a resumed run is the uninterrupted one."""
    data = teacher_samples(tiny_llama(hidden=48, seed=1, sharpness=30.0), batch=8)
    whole = hpd_trainer(tmp_path / "whole", data, seed)
    whole.train()
    resumed = hpd_trainer(tmp_path / "resumed", data, seed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert whole.state.global_step == resumed.state.global_step == 4
    for (name, ours), theirs in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(ours, theirs), name
    # Each evaluation of the same weights is the same number (its draws are its own).
    assert whole.evaluate()["eval_loss"] == whole.evaluate()["eval_loss"]


def test_hf_evaluation_loss_builds_no_full_logits(models, tmp_path):
    """evaluate() takes the fused path (the forward keeps one position's logits); predict() returns the logits."""
    student, teacher = models
    data = teacher_samples(teacher, batch=6)
    kept = []
    student.register_forward_hook(lambda module, args, output: kept.append(tuple(output.logits.shape)))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=3, report_to=[],
                                          use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = hf_integration.DistillationTrainer(model=student, teacher_model=teacher, args=args, objective="fkl")
    evaluated = trainer.evaluate(eval_dataset=Rows(data))["eval_loss"]
    assert kept == [(3, 1, VOCAB)] * 2
    with torch.no_grad():
        halves = [hf_integration.distillation_loss(student, teacher, {key: value[rows] for key, value in data.items()},
                                                   objective="fkl") for rows in (slice(0, 3), slice(3, 6))]
    assert evaluated == pytest.approx(sum(halves).item() / 2, rel=1e-5)

    kept.clear()
    predicted = trainer.predict(Rows(data))   # predictions asked for: the student's full logits
    assert kept == [(3, 12, VOCAB)] * 2 and predicted.predictions.shape == (6, 12, VOCAB)
    assert predicted.metrics["test_loss"] == pytest.approx(evaluated, rel=1e-5)
    kept.clear()
    trainer.args.prediction_loss_only = True
    assert trainer.predict(Rows(data)).predictions is None and kept == [(3, 1, VOCAB)] * 2


def trainer_with(models, tmp_path, **options):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    return hf_integration.DistillationTrainer(model=models[0], teacher_model=models[1], args=args, **options)


@pytest.mark.parametrize("options, error, message", [
    (dict(objective="jsd", beta=1.5), ValueError, r"beta must be a number in \[0, 1\]"),
    (dict(objective="skl", alpha=-0.1), ValueError, r"alpha must be a number in \[0, 1\]"),
    (dict(objective="hpd", fkl_weight=float("nan")), ValueError, "fkl_weight must be a finite number"),
    (dict(objective="hpd", seed=1.5), TypeError, "seed must be an int"),
    (dict(objective="fkl", temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (dict(objective="fkl", ce_weight=-1.0), ValueError, "ce_weight must be a finite number >= 0"),
    (dict(objective="fkl", chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (dict(objective="fkl", backend="cuda"), ValueError, "backend must be one of"),
    # A parameter the objective does not read.
    (dict(objective="fkl", beta=0.3), ValueError, "beta is not an option of objective 'forward_kl'"),
    (dict(objective="jsd", alpha=0.3), ValueError, "alpha is not an option of objective 'jsd'.*beta"),
    (dict(objective="tvd", seed=0), ValueError, "seed is not an option of objective 'tvd'.*TrainingArguments.seed"),
    (dict(objective="jsd", fkl_weight=1.0), ValueError, "fkl_weight is not an option of objective 'jsd'"),
    (dict(objective="hpd", beta=0.5), ValueError, "beta is not an option of objective 'hpd'.*fkl_weight"),
    # Liger's and TRL's names, with ours.
    (dict(objective="jsd", jsd_beta=0.5), TypeError, "jsd_beta.*beta="),
    (dict(objective="fkl", weight_hard_loss=0.5), TypeError, "weight_hard_loss.*ce_weight="),
    (dict(objective="fkl", weight_soft_loss=0.5), TypeError, "weight_soft_loss.*ce_weight="),
])
def test_hf_trainer_checks_its_arguments_when_built(models, tmp_path, options, error, message):
    with pytest.raises(error, match=message):
        trainer_with(models, tmp_path, **options)


def test_hf_trainer_refuses_an_unreadable_cap_when_built(models, tmp_path):
    models[1].config.final_logit_softcapping = -30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=-30.0"):
        trainer_with(models, tmp_path, objective="fkl")


def test_hf_trainer_takes_each_objectives_own_options(models, tmp_path):
    for options in (dict(objective="jsd", beta=0.3), dict(objective="srkl", alpha=0.2),
                    dict(objective="hpd", seed=3, fkl_weight=0.5, rkl_weight=2.0), dict(objective="tvd")):
        trainer_with(models, tmp_path, **options)


def test_hf_loss_refuses_options_and_a_batch_without_labels(models):
    student, teacher = models
    inputs = make_batch()
    with pytest.raises(ValueError, match="beta is not an option of objective 'reverse_kl'"):
        hf_integration.distillation_loss(student, teacher, inputs, objective="rkl", beta=0.5)
    del inputs["labels"]
    with pytest.raises(ValueError, match="labels.*input_ids"):
        hf_integration.distillation_loss(student, teacher, inputs, objective="rkl")


@pytest.mark.parametrize("objective", hpd_kernels.registry.OBJECTIVES)
@pytest.mark.parametrize("count", [float("inf"), float("-inf"), float("nan"), 0, -3, torch.tensor(float("inf")),
                                   torch.tensor(float("nan")), torch.tensor(0)], ids=repr)
def test_num_items_in_batch_must_be_finite_and_positive(models, objective, count):
    """The logits-level and fused-linear losses, and the trainer's loss, refuse it before anything runs."""
    generator = torch.Generator().manual_seed(3)
    student_logits, teacher_logits = (torch.randn(2, 5, 16, generator=generator) for _ in range(2))
    hidden, weight = torch.randn(2, 5, 8, generator=generator), torch.randn(16, 8, generator=generator)
    labels = torch.randint(0, 16, (2, 5), generator=generator)
    if objective == "hpd":
        by_logits, by_hidden = hpd_kernels.hybrid_kl_loss, hpd_kernels.fused_linear_hybrid_kl_loss
    else:
        by_logits = functools.partial(hpd_kernels.divergence_loss, divergence=objective)
        by_hidden = functools.partial(hpd_kernels.fused_linear_divergence_loss, divergence=objective)
    message = "num_items_in_batch must be > 0 and finite"
    with pytest.raises(ValueError, match=message):
        by_logits(student_logits, teacher_logits, labels, num_items_in_batch=count)
    with pytest.raises(ValueError, match=message):
        by_hidden(hidden, weight, hidden, weight, labels, num_items_in_batch=count)
    with pytest.raises(ValueError, match=message):
        hf_integration.distillation_loss(*models, make_batch(), objective=objective, num_items_in_batch=count)
