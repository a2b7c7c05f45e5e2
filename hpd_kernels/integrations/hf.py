"""Distillation in a Hugging Face `transformers.Trainer` through the fused-linear losses.

`distillation_loss(model, teacher_model, inputs, objective=...)` runs the student and (under
`no_grad`, in eval mode) the teacher, takes each one's final hidden states and lm_head weight (and
bias), applies the causal shift (`labels[:, 1:]` against `hidden[:, :-1]`, `-100` ignored, as the
models' own loss does) and calls `fused_linear_hybrid_kl_loss` or `fused_linear_divergence_loss`:
no `[tokens, vocab]` logits of the student or the teacher are built. The forward passes ask for
`output_hidden_states=True` and `logits_to_keep=1` (the models' forward computes the logits of the
last position only; models without that argument compute all of them, which works but costs the
memory), so the call goes through the model's own forward (and so through DDP's hooks).
`hidden_states[-1]` must be the lm_head's input (true of Llama, Qwen2, Mistral, ...: the final norm
is applied to it): the first call on each model checks this against the kept logits and refuses a
model where it is not, as it refuses models that transform their logits after the lm_head.

`DistillationTrainer(model, teacher_model=..., args=..., objective="hpd", ...)` is a `Trainer`
whose `compute_loss` is that loss: `num_items_in_batch`, which the Trainer counts over the shifted
labels of the whole accumulated (and, with `average_tokens_across_devices`, all-ranks) batch,
divides the summed loss, and the Trainer's gradient accumulation then uses the loss as it is.

Not covered: FSDP or DeepSpeed ZeRO-3 (the lm_head weight is read outside the forward, where they
keep it sharded), models whose logits are not `lm_head(hidden_states[-1])`, a hard-label term.
"""

from __future__ import annotations

import inspect
import weakref

import torch
import transformers
from torch import nn

from ..fused_linear import fused_linear_divergence_loss, fused_linear_hybrid_kl_loss
from ..models.hf import _LOGIT_TRANSFORMS
from ..registry import DIVERGENCES, HPD, OBJECTIVES, SHORT_NAMES

__all__ = ["DistillationTrainer", "distillation_loss", "final_hidden_states", "lm_head_of"]

_CHECKED = weakref.WeakSet()   # models whose hidden_states[-1] was checked against their logits


def _unwrap(model):
    """The module under DDP / DataParallel / torch.compile wrappers (the parameters are shared)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def lm_head_of(model):
    """`(weight, bias)` of the model's output embedding; refuses logit transforms after it."""
    model = _unwrap(model)
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no lm_head with a weight (get_output_embeddings() "
                        f"returned {type(head).__name__})")
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value not in (None, 1.0, 1):
            raise ValueError(f"{type(model).__name__} transforms its logits after the lm_head (config.{name}="
                             f"{value}); a fused-linear loss on lm_head(hidden) would not be its loss")
    return head.weight, getattr(head, "bias", None)


def _logits_argument(model):
    model = _unwrap(model)
    if hasattr(model, "get_base_model"):   # PEFT: the wrapper's forward passes its kwargs on
        model = model.get_base_model()
    parameters = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):   # the latter in transformers < 4.50
        if name in parameters:
            return name
    return None


def final_hidden_states(model, inputs, *, keep_logits=False):
    """`(hidden, outputs)`: the input of the lm_head for every position, `[batch, seq, hidden]`.

    `inputs` are the model's keyword arguments (without `labels`). Unless `keep_logits`, the
    forward computes the logits of the last position only (where the model supports it).
    """
    kwargs = dict(inputs, output_hidden_states=True, use_cache=False)
    argument = _logits_argument(model)
    if argument is not None and not keep_logits:
        kwargs[argument] = 1
    outputs = model(**kwargs)
    hidden = outputs.hidden_states[-1]
    unwrapped = _unwrap(model)
    if unwrapped not in _CHECKED:
        _check_hidden_is_head_input(unwrapped, hidden, outputs.logits)
        _CHECKED.add(unwrapped)
    return hidden, outputs


@torch.no_grad()
def _check_hidden_is_head_input(model, hidden, logits):
    weight, bias = lm_head_of(model)
    last = hidden[:, -1].to(weight.dtype)
    ours = torch.nn.functional.linear(last, weight, None if bias is None else bias.to(weight.dtype)).float()
    theirs = logits[:, -1, :ours.shape[-1]].float()
    # Loose enough for a forward run under autocast (bf16 logits: ~0.4% error), far below what a
    # missing final norm or projection changes.
    tolerance = 2e-2 * (1.0 + theirs.abs().max().item())
    if ours.shape != theirs.shape or not (ours - theirs).abs().max().item() <= tolerance:
        raise ValueError(f"{type(model).__name__}: lm_head(hidden_states[-1]) is not the model's logits, so the "
                         f"last hidden state is not the lm_head's input; the fused-linear losses cannot distil it")


def _objective(objective):
    name = SHORT_NAMES.get(objective, objective)
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES} (or {tuple(SHORT_NAMES)}), got {objective!r}")
    return name


def _num_items(num_items_in_batch):
    # Trainer's DataParallel path (n_gpu > 1) repeats the count in a vector.
    if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.numel() > 1:
        return num_items_in_batch.reshape(-1)[0]
    return num_items_in_batch


def distillation_loss(model, teacher_model, inputs, *, objective="hpd", temperature=1.0, fkl_weight=1.0,
                      rkl_weight=1.0, beta=0.5, alpha=0.1, seed=None, ignore_index=-100, num_items_in_batch=None,
                      reduction="mean", chunk_size=None, backend="auto", ce_weight=0.0, return_outputs=False):
    """The distillation loss of a causal-LM batch (`inputs` with `labels`), without full logits.

    `objective`: `"hpd"` (options `fkl_weight`, `rkl_weight`, `seed`: None draws one from torch's
    generator) or a divergence (`forward_kl`, `reverse_kl`, `jsd` with `beta`, `skew_forward_kl` /
    `skew_reverse_kl` with `alpha`, `tvd`; the short names `fkl`, `rkl`, ... too). The teacher runs
    under `no_grad` and is put in eval mode. `num_items_in_batch` (with `reduction="mean"`) divides
    the summed loss instead of this batch's active tokens. `ce_weight` adds the fused hard-label
    term (`ce_weight` times the data's cross-entropy at `temperature`). `return_outputs=True` also returns the
    student's outputs, with full logits (for evaluation).
    """
    name = _objective(objective)
    labels = inputs["labels"]
    model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    student_hidden, outputs = final_hidden_states(model, model_inputs, keep_logits=return_outputs)
    if teacher_model.training:
        teacher_model.eval()
    with torch.no_grad():
        teacher_hidden, _ = final_hidden_states(teacher_model, model_inputs)
    student_weight, student_bias = lm_head_of(model)
    teacher_weight, teacher_bias = lm_head_of(teacher_model)
    shifted = dict(student_hidden=student_hidden[:, :-1], student_weight=student_weight, student_bias=student_bias,
                   teacher_hidden=teacher_hidden[:, :-1], teacher_weight=teacher_weight,
                   teacher_bias=teacher_bias, labels=labels[:, 1:].to(student_hidden.device),
                   temperature=temperature, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
                   backend=backend, num_items_in_batch=_num_items(num_items_in_batch), ce_weight=ce_weight)
    if name == HPD:
        loss = fused_linear_hybrid_kl_loss(**shifted, seed=seed, fkl_weight=fkl_weight, rkl_weight=rkl_weight)
    else:
        assert name in DIVERGENCES
        loss = fused_linear_divergence_loss(**shifted, divergence=name, beta=beta, alpha=alpha)
    return (loss, outputs) if return_outputs else loss


class DistillationTrainer(transformers.Trainer):
    """A `transformers.Trainer` that distils `teacher_model` into `model` (see `distillation_loss`).

    The objective's options are keyword arguments; every other argument is `Trainer`'s. With an
    int `seed`, HPD's draw of each micro-batch uses `seed + global_step * accumulation + i`
    (reproducible, different every micro-batch); with `seed=None` it comes from torch's generator,
    which the Trainer seeds from `args.seed`.
    """

    def __init__(self, model=None, teacher_model=None, args=None, *trainer_args, objective="hpd", temperature=1.0,
                 fkl_weight=1.0, rkl_weight=1.0, beta=0.5, alpha=0.1, seed=None, chunk_size=None, backend="auto",
                 ce_weight=0.0, **trainer_kwargs):
        if teacher_model is None:
            raise ValueError("DistillationTrainer needs a teacher_model")
        self.objective = _objective(objective)
        self.objective_options = dict(temperature=temperature, fkl_weight=fkl_weight, rkl_weight=rkl_weight,
                                      beta=beta, alpha=alpha, chunk_size=chunk_size, backend=backend,
                                      ce_weight=ce_weight)
        self.seed = seed
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        teacher_model.requires_grad_(False)
        self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True) \
            if hasattr(self.accelerator, "prepare_model") else teacher_model.to(self.args.device)
        self.teacher_model.eval()
        self._micro_step = (-1, 0)   # (global_step, micro-batches seen in it)

    def _next_seed(self):
        if self.seed is None:
            return None
        step, micro = self._micro_step
        micro = micro + 1 if step == self.state.global_step else 0
        self._micro_step = (self.state.global_step, micro)
        return int(self.seed) + self.state.global_step * max(self.args.gradient_accumulation_steps, 1) + micro

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = distillation_loss(model, self.teacher_model, inputs, objective=self.objective,
                                   seed=self._next_seed() if self.objective == HPD else None,
                                   num_items_in_batch=num_items_in_batch, return_outputs=return_outputs,
                                   **self.objective_options)
        loss, outputs = result if return_outputs else (result, None)
        # As Trainer.compute_loss: `num_items_in_batch` counts every rank's tokens while DDP averages
        # the gradients over the ranks, so the sum is scaled back up.
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss = loss * (self.accelerator.num_processes // tp_size if self.args.n_gpu <= 1 else self.args.n_gpu)
        # Divided by the accumulated batch's token count: the Trainer must not divide it again.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        # Evaluation's predictions: the student's logits (not its tuple of hidden states).
        return (loss, {"logits": outputs.logits}) if return_outputs else loss
