"""How a model is scored on a workload's held-out problems: exact-match accuracy of its
generations (greedy and sampled) and, teacher-forced, its cross-entropy and KL to the teacher."""

from __future__ import annotations

import statistics

import torch

import hpd_kernels

from ..models import output_logits
from .criteria import shifted_labels
from .task import answer_accuracy, encode_examples
from .trainer import collate

IGNORE_INDEX = -100  # the label of prompt and padding positions


@torch.no_grad()
def heldout_statistics(model, workload, teacher=None, batch_size=128):
    """Teacher-forced cross-entropy of `model` on the evaluation responses (nats/token) and, with
    `teacher`, the forward and reverse KL between them per token (temperature 1), in float64.
    The KL is the library's own (torch backend), over the vocabulary the two models share."""
    examples = encode_examples(workload.eval_problems, workload.tokenizer)
    device = model.lm_head.weight.device
    totals = {"heldout_ce": 0.0, "fkl_to_teacher": 0.0, "rkl_to_teacher": 0.0}
    tokens = 0
    was_training = model.training
    model.eval()
    for start in range(0, len(examples), batch_size):
        input_ids, loss_mask = collate(examples[start:start + batch_size], workload.tokenizer.pad_id, device)
        labels = shifted_labels(input_ids, loss_mask, ignore_index=IGNORE_INDEX).flatten()
        attention = (input_ids != workload.tokenizer.pad_id).long() | loss_mask
        active = labels != IGNORE_INDEX
        student_logits = output_logits(model, model(input_ids, attention_mask=attention)).flatten(0, 1).double()
        log_q = torch.log_softmax(student_logits[active], -1)
        totals["heldout_ce"] += float(-log_q.gather(-1, labels[active][:, None]).sum())
        if teacher is not None:
            teacher_logits = output_logits(teacher, teacher(input_ids, attention_mask=attention)).flatten(0, 1).double()
            per_token = dict(ignore_index=IGNORE_INDEX, reduction="none", backend="torch")
            totals["fkl_to_teacher"] += float(
                hpd_kernels.forward_kl_loss(student_logits, teacher_logits, labels, **per_token).sum())
            totals["rkl_to_teacher"] += float(
                hpd_kernels.reverse_kl_loss(student_logits, teacher_logits, labels, **per_token).sum())
        tokens += int(active.sum())
    model.train(was_training)
    if teacher is None:
        del totals["fkl_to_teacher"], totals["rkl_to_teacher"]
    return {key: value / max(1, tokens) for key, value in totals.items()}


def _accuracy(model, workload, eval_config, *, greedy, seed, top_p=1.0):
    return answer_accuracy(model, workload.eval_problems, workload.tokenizer, greedy=greedy,
                           temperature=eval_config["temperature"], top_p=top_p,
                           max_new_tokens=eval_config["max_new_tokens"], seed=seed, score=workload.score)


def _sampled_accuracies(model, workload, eval_config, seed):
    """`{metric: accuracy}` of one draw of each sampled decoding: at `temperature`, and with
    `top_p` set, from the nucleus of that mass too."""
    result = {"sampled_accuracy": _accuracy(model, workload, eval_config, greedy=False, seed=seed)}
    if eval_config.get("top_p") is not None:
        result["top_p_accuracy"] = _accuracy(model, workload, eval_config, greedy=False, seed=seed,
                                             top_p=eval_config["top_p"])
    return result


def evaluate_model(model, workload, eval_config, teacher=None):
    """Greedy and sampled exact-match accuracy (and top-p sampled, with `eval.top_p`), held-out
    cross-entropy (and KL to the teacher)."""
    return {
        "greedy_accuracy": _accuracy(model, workload, eval_config, greedy=True, seed=eval_config["seed"]),
        **_sampled_accuracies(model, workload, eval_config, eval_config["seed"]),
        **heldout_statistics(model, workload, teacher),
    }


def evaluate_with_samples(model, workload, eval_config, teacher, samples):
    """`evaluate_model`, with each sampled accuracy averaged over `samples` independent draws."""
    result = evaluate_model(model, workload, eval_config, teacher)
    if samples > 1:
        draws = [result] + [_sampled_accuracies(model, workload, eval_config, eval_config["seed"] + draw)
                            for draw in range(1, samples)]
        for key in draws[-1]:
            result[key] = statistics.fmean(draw[key] for draw in draws)
    return result


def final_evaluation(history):
    """The evaluation of a run's last step, from its metric records (without the `eval_` prefix)."""
    return {key.removeprefix("eval_"): value for key, value in history[-1].items() if key.startswith("eval_")}
