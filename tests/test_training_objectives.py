"""The trainer's objectives are the library's losses on shifted, prompt-masked rows."""

import pytest
import torch

import hpd_kernels
from hpd_kernels import reference
from hpd_kernels.models import DecoderConfig, DecoderLM
from hpd_kernels.training import TRAINING_OBJECTIVES, distillation_loss, shifted_labels


def test_shifted_labels_mask_prompt_and_predict_the_next_token():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 0]])
    assert shifted_labels(ids, mask).tolist() == [[-100, 7, 8, -100, -100]]


@pytest.mark.parametrize("objective", TRAINING_OBJECTIVES)
def test_objective_equals_reference_on_the_same_batch(objective):
    torch.manual_seed(0)
    student = DecoderLM(DecoderConfig(vocab_size=11, hidden_size=8, num_layers=1, num_heads=2)).double()
    teacher = DecoderLM(DecoderConfig(vocab_size=13, hidden_size=12, num_layers=1, num_heads=2)).double()
    ids = torch.randint(0, 11, (2, 6))
    labels = shifted_labels(ids, torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]]))
    hidden, teacher_hidden = student(ids), teacher(ids).detach()
    loss, details, *_ = distillation_loss(objective, hidden, student.lm_head.weight, teacher_hidden,
                                          teacher.lm_head.weight, labels, seed=3, backend="torch")
    student_logits, teacher_logits = student.lm_head(hidden), teacher.lm_head(teacher_hidden)
    expected = {
        "sft": lambda: reference.sft_loss(student_logits, labels),
        "fkl": lambda: reference.forward_kl_loss(student_logits, teacher_logits, labels),
        "rkl": lambda: reference.reverse_kl_loss(student_logits, teacher_logits, labels),
        "jsd": lambda: reference.generalized_jsd_loss(student_logits, teacher_logits, labels),
        "skl": lambda: reference.skew_forward_kl_loss(student_logits, teacher_logits, labels),
        "srkl": lambda: reference.skew_reverse_kl_loss(student_logits, teacher_logits, labels),
        "tvd": lambda: reference.tvd_loss(student_logits, teacher_logits, labels),
        "hpd": lambda: reference.hybrid_kl_loss(student_logits, teacher_logits, labels,
                                                details.sampled_ids.clamp(min=0)),
    }[objective]()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-10, atol=1e-12)
    params = list(student.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    expected_grads = torch.autograd.grad(expected, params)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, rtol=1e-8, atol=1e-11)


def _toy_examples(n=64, vocab=11, seed=0):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        prompt = torch.randint(3, vocab, (3,), generator=generator).tolist()
        examples.append((prompt, [(token * 2) % vocab for token in prompt] + [2]))  # a learnable mapping, EOS=2
    return examples


def test_trainer_batch_loss_is_the_library_loss():
    from hpd_kernels.training.trainer import TrainConfig, batch_loss, collate

    torch.manual_seed(0)
    student = DecoderLM(DecoderConfig(vocab_size=11, hidden_size=8, num_layers=1, num_heads=2)).double()
    teacher = DecoderLM(DecoderConfig(vocab_size=11, hidden_size=16, num_layers=1, num_heads=2)).double()
    input_ids, loss_mask = collate(_toy_examples(4), 0, "cpu")
    config = TrainConfig(objective="hpd", backend="torch")
    loss, metrics = batch_loss(config, student, teacher, input_ids, loss_mask, 0, seed=9)
    labels = shifted_labels(input_ids, loss_mask)
    attention = (input_ids != 0).long() | loss_mask
    expected = hpd_kernels.hybrid_kl_loss(student.lm_head(student(input_ids, attention_mask=attention)),
                                          teacher.lm_head(teacher(input_ids, attention_mask=attention)), labels,
                                          seed=9, backend="torch")
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    assert 0.0 <= metrics["mismatch_rate"] <= 1.0
    # The reported cross-entropy and entropy are the student's own, on the same active tokens.
    with torch.no_grad():
        logits = student.lm_head(student(input_ids, attention_mask=attention))
    expected_ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    log_q = torch.log_softmax(logits[labels != -100], -1)
    assert metrics["cross_entropy"] == pytest.approx(float(expected_ce), rel=1e-6)
    assert metrics["entropy"] == pytest.approx(float(-(log_q.exp() * log_q).sum(-1).mean()), rel=1e-6)


@pytest.mark.parametrize("objective", ["sft", "hpd"])
def test_a_short_run_decreases_the_loss(objective):
    from hpd_kernels.training.trainer import TrainConfig, train

    torch.manual_seed(0)
    examples = _toy_examples()
    teacher = DecoderLM(DecoderConfig(vocab_size=11, hidden_size=32, num_layers=2, num_heads=2))
    if objective != "sft":  # a teacher that knows the task
        train(TrainConfig(objective="sft", steps=60, batch_size=16, lr=1e-2, warmup_steps=5), teacher, None,
              examples, log=None)
    student = DecoderLM(DecoderConfig(vocab_size=11, hidden_size=16, num_layers=1, num_heads=2))
    history = train(TrainConfig(objective=objective, steps=40, batch_size=16, lr=1e-2, warmup_steps=5,
                                backend="torch"), student, teacher.eval(), examples, log=None)
    first = sum(h["cross_entropy"] for h in history[:5]) / 5
    last = sum(h["cross_entropy"] for h in history[-5:]) / 5
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("extra_teacher_tokens", [0, 3])
def test_heldout_kl_matches_a_direct_float64_computation(extra_teacher_tokens):
    """The evaluation's KL numbers (the library's losses, per token) against the definition:
    KL(p || q) and KL(q || p) over the shared vocabulary, the teacher's extra rows dropped."""
    from hpd_kernels.training.config import load_config
    from hpd_kernels.training.evaluation import heldout_statistics
    from hpd_kernels.training.task import encode_examples
    from hpd_kernels.training.trainer import collate
    from hpd_kernels.training.workload import Workload, build_model

    config = load_config()
    config["task"].update(train_problems=4, eval_problems=5)
    workload = Workload(config)
    vocab = workload.tokenizer.vocab_size
    student = build_model({"decoder": {"hidden_size": 8, "num_layers": 1, "num_heads": 2}}, workload.tokenizer,
                          "student", "cpu")
    teacher = build_model({"decoder": {"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                                       "vocab_size": vocab + extra_teacher_tokens}}, workload.tokenizer, "teacher",
                          "cpu")
    statistics = heldout_statistics(student, workload, teacher)  # one batch, as below

    input_ids, loss_mask = collate(encode_examples(workload.eval_problems, workload.tokenizer),
                                   workload.tokenizer.pad_id, "cpu")
    attention = (input_ids != workload.tokenizer.pad_id).long() | loss_mask
    active = shifted_labels(input_ids, loss_mask) != -100
    with torch.no_grad():
        log_q = torch.log_softmax(student.lm_head(student(input_ids, attention_mask=attention))[active].double(), -1)
        teacher_logits = teacher.lm_head(teacher(input_ids, attention_mask=attention))[active].double()
    log_p = torch.log_softmax(teacher_logits[:, :vocab], -1)
    tokens = int(active.sum())
    expected_fkl = float((log_p.exp() * (log_p - log_q)).sum()) / tokens
    expected_rkl = float((log_q.exp() * (log_q - log_p)).sum()) / tokens
    assert statistics["fkl_to_teacher"] == pytest.approx(expected_fkl, rel=1e-12)
    assert statistics["rkl_to_teacher"] == pytest.approx(expected_rkl, rel=1e-12)
    assert statistics["heldout_ce"] == pytest.approx(float(-log_q.gather(-1, shifted_labels(
        input_ids, loss_mask)[active][:, None]).sum()) / tokens, rel=1e-12)
