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
model where it is not. What a model does to its logits after the lm_head (Gemma's
`final_logit_softcapping`, a `logit_scale`, ...: `models.hf.logit_post_processing`, read as TRL
reads it) is passed to the losses, which apply it in their own passes. The lm_head
itself must be a plain `nn.Linear` (its output `F.linear(hidden, weight, bias)`, which is what the
losses compute from its weight): an adapter on it (PEFT's LoRA with `lm_head` in `target_modules`),
another forward or a forward hook is refused by name, on every call.

`DistillationTrainer(model, teacher_model=..., args=..., objective="hpd", ...)` is a `Trainer`
whose `compute_loss` is that loss: `num_items_in_batch`, which the Trainer counts over the shifted
labels of the whole accumulated (and, with `average_tokens_across_devices`, all-ranks) batch,
divides the summed loss, and the Trainer's gradient accumulation then uses the loss as it is. Its
arguments are checked when it is built. Evaluation takes the same fused path, with draws of its own.

Not covered: FSDP or DeepSpeed ZeRO-3 (the lm_head weight is read outside the forward, where they
keep it sharded), models whose logits are not those maps of `lm_head(hidden_states[-1])`, adapters on the lm_head.
"""

from __future__ import annotations

import collections
import inspect
import weakref

import torch
import transformers
from torch import nn

from ..checks import check_ce_weight, check_chunk_size, check_fraction, check_hpd_options, check_options
from ..fused_linear import fused_linear_divergence_loss, fused_linear_hybrid_kl_loss
from ..models.hf import logit_map_arguments, logit_post_processing
from ..ops.common import map_logits
from ..registry import HPD, MIXTURE_PARAMETER, OBJECTIVES, SHORT_NAMES

__all__ = ["DistillationTrainer", "batch_labels", "distillation_loss", "final_hidden_states", "lm_head_of"]

_CHECKED = weakref.WeakSet()   # models whose hidden_states[-1] was checked against their logits

# The options only some objectives read (the others, temperature, ce_weight, ..., every objective
# reads): a divergence's mixture parameter (registry.MIXTURE_PARAMETER), HPD's the arguments of
# checks.check_hpd_options. An option an objective does not read is refused, never ignored.
_HPD_OPTIONS = ("fkl_weight", "rkl_weight", "seed")
_OBJECTIVE_OPTIONS = tuple(sorted(set(MIXTURE_PARAMETER.values()))) + _HPD_OPTIONS

# Liger's and TRL's names for DistillationTrainer's arguments, with ours.
_PEER_ARGUMENTS = {
    "jsd_beta": "Liger's jsd_beta is beta= here, with objective='jsd' (the same convention: 0 forward KL, "
                "1 reverse KL)",
    **dict.fromkeys(("weight_hard_loss", "weight_soft_loss"),
                    "Liger's loss is weight_hard_loss * CE + weight_soft_loss * distillation; here the distillation "
                    "term has weight 1 and ce_weight= weighs the hard-label term: ce_weight=weight_hard_loss / "
                    "weight_soft_loss gives Liger's loss divided by weight_soft_loss (the cross-entropy is taken at "
                    "temperature=, Liger's at 1)"),
}


def _unwrap(model):
    """The module under DDP / DataParallel / torch.compile wrappers (the parameters are shared)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _moves_devices_only(head):
    """Whether the head's replaced forward is accelerate's device placement (a `device_map` across
    devices): it moves the input and output and computes the linear layer itself."""
    try:
        from accelerate.hooks import AlignDevicesHook
    except ImportError:
        return False
    hook = getattr(head, "_hf_hook", None)
    return isinstance(hook, AlignDevicesHook) and not hook.offload


def _check_head_is_linear(model, head):
    """The losses compute `F.linear(hidden, head.weight, head.bias)`: refuse a head whose output is
    anything else. An adapter on the output layer adds its own term to the output, which the weight
    alone would leave out of the loss (and the adapter untrained); exact paths for the adapter kinds
    (dropout, DoRA, several adapters, ...) are not attempted."""
    name = f"{type(model).__name__}.get_output_embeddings()"
    kind = f"{type(head).__module__}.{type(head).__qualname__}"
    if type(head).__module__.split(".")[0] == "peft":
        raise ValueError(f"{name} is a PEFT layer ({kind}): an adapter (LoRA, ...) or modules_to_save on the output "
                         f"layer changes its output, which the fused-linear losses, reading lm_head.weight, would "
                         f"neither see nor train; leave lm_head out of target_modules and modules_to_save, or merge "
                         f"the adapter first (merge_and_unload())")
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise ValueError(f"{name} is a {kind}, whose forward is not nn.Linear's: its output need not be "
                         f"F.linear(hidden, weight, bias), which the fused-linear losses compute from its weight")
    if head._forward_hooks or head._forward_pre_hooks:
        raise ValueError(f"{name} has a forward hook, which may change its input or output: the fused-linear losses "
                         f"compute F.linear(hidden, weight, bias) from its weight without running it")
    if "forward" in vars(head) and not _moves_devices_only(head):
        raise ValueError(f"{name} has its forward replaced on the instance: its output need not be "
                         f"F.linear(hidden, weight, bias), which the fused-linear losses compute from its weight")


def lm_head_of(model):
    """`(weight, bias)` of the model's output embedding, a plain `nn.Linear` (what the model does to its
    output after it, `models.hf.logit_post_processing`, goes to the loss as logit maps)."""
    model = _unwrap(model)
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no lm_head with a weight (get_output_embeddings() "
                        f"returned {type(head).__name__})")
    _check_head_is_linear(model, head)
    return head.weight, head.bias


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
    scale, softcap = logit_post_processing(model.config)
    ours = map_logits(ours, scale, softcap or 0.0)   # what the model does after its lm_head
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


def _options_of(name):
    """The options of `_OBJECTIVE_OPTIONS` that objective `name` reads."""
    if name == HPD:
        return _HPD_OPTIONS
    return (MIXTURE_PARAMETER[name],) if name in MIXTURE_PARAMETER else ()


def _loss_options(objective, *, temperature, ignore_index, reduction, chunk_size, backend, ce_weight, **own):
    """`(name, options)`: the objective's library name and the keyword arguments of its fused-linear
    loss, checked as the loss checks them (before any model runs). `own`: `_OBJECTIVE_OPTIONS`,
    None where not given (the loss's default); one the objective does not read is refused."""
    name = _objective(objective)
    reads = _options_of(name)
    given = {option: value for option, value in own.items() if value is not None}
    for option in given:
        if option not in reads:
            also = " (the Trainer's own seed is TrainingArguments.seed)" if option == "seed" else ""
            raise ValueError(f"{option} is not an option of objective {name!r}, which reads "
                             f"{', '.join(reads) or 'none of ' + ', '.join(_OBJECTIVE_OPTIONS)}{also}")
    check_options(temperature, reduction, backend, ignore_index)
    check_ce_weight(ce_weight)
    check_chunk_size(chunk_size)
    if name == HPD:   # the options not given are checked at the loss's defaults
        defaults = inspect.signature(fused_linear_hybrid_kl_loss).parameters
        check_hpd_options(**{option: given.get(option, defaults[option].default) for option in _HPD_OPTIONS})
    else:
        for option, value in given.items():   # the divergence's mixture parameter
            check_fraction(option, value)
    return name, dict(given, temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                      chunk_size=chunk_size, backend=backend, ce_weight=ce_weight)


def batch_labels(inputs):
    """The batch's `labels`, with an error naming them where the batch has none."""
    labels = inputs.get("labels")
    if labels is None:
        raise ValueError(f"the batch has no labels (its keys: {sorted(inputs)}): distillation needs labels, the token "
                         f"ids with -100 where a position is not in the loss (DataCollatorForLanguageModeling("
                         f"tokenizer, mlm=False) adds them)")
    return labels


def _num_items(num_items_in_batch):
    # Trainer's DataParallel path (n_gpu > 1) repeats the count in a vector.
    if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.numel() > 1:
        return num_items_in_batch.reshape(-1)[0]
    return num_items_in_batch


def distillation_loss(model, teacher_model, inputs, *, objective="hpd", temperature=1.0, fkl_weight=None,
                      rkl_weight=None, beta=None, alpha=None, seed=None, ignore_index=-100, num_items_in_batch=None,
                      reduction="mean", chunk_size=None, backend="auto", ce_weight=0.0, return_outputs=False,
                      report=None):
    """The distillation loss of a causal-LM batch (`inputs` with `labels`), without full logits.

    `objective`: `"hpd"` (options `fkl_weight`, `rkl_weight`, `seed`: None draws one from torch's
    generator) or a divergence (`forward_kl`, `reverse_kl`, `jsd` with `beta`, `skew_forward_kl` /
    `skew_reverse_kl` with `alpha`, `tvd`; the short names `fkl`, `rkl`, ... too). An option left
    None is the loss function's default; one the objective does not read is an error. The teacher
    runs under `no_grad` and is put in eval mode. `num_items_in_batch` (with `reduction="mean"`)
    divides the summed loss instead of this batch's active tokens. `ce_weight` adds the fused
    hard-label term (`ce_weight` times the data's cross-entropy at `temperature`).
    `return_outputs=True` also returns the student's outputs, with full logits (for predictions).
    `report`: a dict to fill with this batch's means over its tokens in the loss, from the loss's own
    passes (detached 0-dim tensors): the student's `entropy` and the data's `cross_entropy` (both at
    `temperature`), and HPD's `mismatch_rate` (`y_hat != y`).
    """
    name, options = _loss_options(objective, temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                                  chunk_size=chunk_size, backend=backend, ce_weight=ce_weight, fkl_weight=fkl_weight,
                                  rkl_weight=rkl_weight, beta=beta, alpha=alpha, seed=seed)
    labels = batch_labels(inputs)
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
                   num_items_in_batch=_num_items(num_items_in_batch), **options,
                   **logit_map_arguments(_unwrap(model).config, _unwrap(teacher_model).config))
    if report is None:
        loss = (fused_linear_hybrid_kl_loss(**shifted) if name == HPD
                else fused_linear_divergence_loss(**shifted, divergence=name))
    else:
        loss = _reported_loss(name, shifted, report)
    return (loss, outputs) if return_outputs else loss


def _reported_loss(name, shifted, report):
    """The loss, filling `report` (see `distillation_loss`) from the parts it returns."""
    extra = dict(return_parts=True, return_entropy=True)
    if name == HPD:
        loss, details, parts, entropy = fused_linear_hybrid_kl_loss(**shifted, return_details=True, **extra)
        report["mismatch_rate"] = details.mismatch_rate
    else:
        loss, parts, entropy = fused_linear_divergence_loss(**shifted, divergence=name, **extra)
    vocab = min(shifted["student_weight"].shape[0], shifted["teacher_weight"].shape[0])
    active = (shifted["labels"] != shifted["ignore_index"]) & (shifted["labels"] < vocab)
    count = active.sum().clamp(min=1)
    # The part is reduced as the loss: over `num_items_in_batch` when given, else this batch's mean.
    divisor = shifted["num_items_in_batch"] if shifted["num_items_in_batch"] is not None else count
    report["cross_entropy"] = parts.cross_entropy * torch.as_tensor(divisor, device=count.device) / count
    report["entropy"] = entropy.sum() / count
    return loss


class DistillationTrainer(transformers.Trainer):
    """A `transformers.Trainer` that distils `teacher_model` into `model` (see `distillation_loss`).

    The objective's options are keyword arguments, checked here, when the trainer is built (an
    option the objective does not read is an error, as are Liger's and TRL's names for ours); every
    other argument is `Trainer`'s. With an int `seed`, HPD's draw of each training micro-batch uses
    `seed + global_step * accumulation + i` (reproducible, different every micro-batch); with
    `seed=None` it comes from torch's generator, which the Trainer seeds from `args.seed`.

    Evaluation (`evaluate()`, and `predict()` with `prediction_loss_only`) computes the loss through
    the same fused path, without `[tokens, vocab]` logits. Its HPD draws are its own: batch `i` of
    every evaluation uses `seed + i` (`args.seed + i` with `seed=None`), so evaluating never moves
    training's seeds or generator (a run resumed from a checkpoint is the uninterrupted one) and the
    same weights always get the same evaluation loss. The student's full logits are built only where
    predictions are asked for: `predict()` (unless `args.prediction_loss_only`) and `evaluate()` with
    `compute_metrics`, which receive them as `[examples, seq, vocab]` predictions.
    """

    def __init__(self, model=None, teacher_model=None, args=None, *trainer_args, objective="hpd", temperature=1.0,
                 fkl_weight=None, rkl_weight=None, beta=None, alpha=None, seed=None, chunk_size=None, backend="auto",
                 ce_weight=0.0, **trainer_kwargs):
        for name in trainer_kwargs.keys() & _PEER_ARGUMENTS.keys():
            raise TypeError(f"DistillationTrainer got an unexpected keyword argument {name!r}: "
                            f"{_PEER_ARGUMENTS[name]}")
        if teacher_model is None:
            raise ValueError("DistillationTrainer needs a teacher_model")
        self.objective, self.loss_options = _loss_options(
            objective, temperature=temperature, ignore_index=-100, reduction="mean", chunk_size=chunk_size,
            backend=backend, ce_weight=ce_weight, fkl_weight=fkl_weight, rkl_weight=rkl_weight, beta=beta, alpha=alpha,
            seed=seed)
        self.seed = self.loss_options.pop("seed", None)   # per micro-batch, from _hpd_seed
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        teacher_model.requires_grad_(False)
        self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True) \
            if hasattr(self.accelerator, "prepare_model") else teacher_model.to(self.args.device)
        self.teacher_model.eval()
        # A logit scale or soft cap that cannot be applied is an error now, not at the first step.
        logit_map_arguments(_unwrap(self.model).config, _unwrap(self.teacher_model).config)
        self._micro_step = (-1, 0)        # training: (global_step, micro-batches seen in it)
        # Per-batch metrics from the loss's own passes, averaged into each log (as TRL's trainers do).
        self._reported = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
        self._evaluation_batches = 0      # batches of the evaluation under way
        self._return_logits = True        # False in a prediction_step that returns the loss only

    def _hpd_seed(self, training):
        """HPD's seed of this micro-batch (None: drawn from torch's generator); None for a divergence."""
        if self.objective != HPD:
            return None
        if not training:
            self._evaluation_batches += 1
            return (self.args.seed if self.seed is None else int(self.seed)) + self._evaluation_batches - 1
        if self.seed is None:
            return None
        step, micro = self._micro_step
        micro = micro + 1 if step == self.state.global_step else 0
        self._micro_step = (self.state.global_step, micro)
        return int(self.seed) + self.state.global_step * max(self.args.gradient_accumulation_steps, 1) + micro

    def evaluation_loop(self, *args, **kwargs):
        self._evaluation_batches = 0   # every evaluation draws the same seeds, whenever it runs
        return super().evaluation_loop(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Trainer's step asks compute_loss for the outputs even when it returns the loss only: the
        # student's logits are built only when they are returned.
        self._return_logits = not prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._return_logits = True

    def log(self, logs, *args, **kwargs):
        """Trainer's log, with the reported metrics' means since the last one (`eval_`-prefixed in
        an evaluation's log)."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + key: sum(values) / len(values) for key, values in self._reported[mode].items() if values})
        self._reported[mode].clear()
        return super().log(logs, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        keep_logits = return_outputs and self._return_logits
        report = {}
        result = distillation_loss(model, self.teacher_model, inputs, objective=self.objective,
                                   seed=self._hpd_seed(model.training), num_items_in_batch=num_items_in_batch,
                                   return_outputs=keep_logits, report=report, **self.loss_options)
        loss, outputs = result if keep_logits else (result, None)
        reported = self._reported["train" if model.training else "eval"]
        for key, value in report.items():
            reported[key].append(self.accelerator.gather_for_metrics(value.detach().reshape(1)).mean().item())
        # As Trainer.compute_loss: `num_items_in_batch` counts every rank's tokens while DDP averages
        # the gradients over the ranks, so the sum is scaled back up.
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss = loss * (self.accelerator.num_processes // tp_size if self.args.n_gpu <= 1 else self.args.n_gpu)
        # Divided by the accumulated batch's token count: the Trainer must not divide it again.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if not return_outputs:
            return loss
        # Predictions: the student's logits (not its tuple of hidden states); none for the loss alone.
        return loss, ({"logits": outputs.logits} if keep_logits else {})
