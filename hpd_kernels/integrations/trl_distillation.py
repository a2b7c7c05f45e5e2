"""Our losses in TRL's `DistillationTrainer` (TRL's stable on-policy distillation trainer).

`DistillationTrainer` is `trl.DistillationTrainer` with one method replaced, `_compute_loss`: the
student's and the teacher's hidden states of the completion positions (TRL's
`_get_last_hidden_state`, so its multimodal inputs, device checks and FSDP2 heads are as in TRL) go
to `fused_linear_hybrid_kl_loss` or `fused_linear_divergence_loss` with each model's lm_head.
Everything else is TRL's: generation (vLLM or transformers, the tool loop and its `tool_mask`),
`compute_loss` (the `num_items_in_batch` of the generated completions, `_forward_redirection`, the
entropy metric), logging and checkpoints.

The objective is `loss=` (`"forward_kl"`, `"reverse_kl"`, `"jsd"`, `"skew_forward_kl"`,
`"skew_reverse_kl"`, `"tvd"`, `"hpd"`, or the short names `fkl`, `rkl`, ...) with its options in
`loss_options=` (`beta`, `alpha`, `fkl_weight`, `rkl_weight`, `seed`, `ce_weight`, `chunk_size`,
`backend`), checked when the trainer is built. Without `loss`, the objective is TRL's own: its
`DistillationConfig.beta` as forward KL (0), reverse KL (1) or the JSD with that `beta` (`"jsd"`
without a `beta` option takes it as well). The temperature is TRL's `temperature`, as in TRL.

Alignment: TRL feeds `prompt + completion` and keeps hidden states `P - 1 .. P + C - 2`, so hidden
state `k` predicts completion token `k`; the labels are `completion_ids` where the loss mask
(`completion_mask * tool_mask`) is 1. HPD's `y_hat` is drawn by the kernel at those (offline)
prefixes, its seed `seed + global_step * accumulation + micro_batch` in training (`seed`:
`TrainingArguments.seed` unless given) and `seed + i` for evaluation batch `i`, as in
`hpd_kernels.integrations.hf.DistillationTrainer`, so a resumed run draws what the uninterrupted one
did. The teacher may have a vocabulary of another size (TRL refuses it; the losses compare the
shared ids). The loss is summed and divided as TRL divides (`num_items_in_batch`, else this
micro-batch's valid tokens, at least 1). Each model's logit scale and soft cap are read from its
config as TRL reads them (`logit_post_processing`, from `hpd_kernels.models.hf`) and applied inside
the kernels; the student's entropy that TRL logs comes from the loss's own pass.
"""

from __future__ import annotations

import torch
import trl
from trl.models import prepare_deepspeed

from ..fused_linear import fused_linear_divergence_loss, fused_linear_hybrid_kl_loss
from ..models.hf import logit_map_arguments, logit_post_processing
from ..registry import HPD
from .hf import _OBJECTIVE_OPTIONS, _loss_options
from .hf import DistillationTrainer as _HFDistillationTrainer

__all__ = ["DistillationTrainer", "LOSS_OPTIONS", "logit_post_processing"]

_IGNORE = -100
LOSS_OPTIONS = _OBJECTIVE_OPTIONS + ("ce_weight", "chunk_size", "backend")
# The inputs TRL's generation adds for vision-language models, passed on to the backbones.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _objective(loss, options, beta, temperature):
    """`(name, loss options)`, checked: `loss=None` is TRL's objective for its `beta`."""
    unknown = sorted(set(options) - set(LOSS_OPTIONS))
    if unknown:
        raise ValueError(f"loss_options has {unknown[0]!r}, which is not an option of the losses; they are "
                         f"{', '.join(LOSS_OPTIONS)}")
    options = dict(options)
    if loss is None:
        loss = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(float(beta), "jsd")
    if loss == "jsd":
        options.setdefault("beta", beta)
    shared = dict(chunk_size=options.pop("chunk_size", None), backend=options.pop("backend", "auto"),
                  ce_weight=options.pop("ce_weight", 0.0))
    name, checked = _loss_options(loss, temperature=temperature, ignore_index=_IGNORE, reduction="sum", **shared,
                                  **options)
    del checked["temperature"]   # the trainer's, at each call
    return name, checked


def _vocab_size(model):
    config = getattr(model, "config", None)
    return None if config is None else config.get_text_config().vocab_size


def _whole(weight, bias, dtype):
    """The lm_head's weight and bias as plain tensors: an FSDP2 `DTensor` gathered once (TRL does
    the same, casting the weight to the hidden states' dtype)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return weight, bias
    if not isinstance(weight, DTensor):
        return weight, bias
    return weight.full_tensor().to(dtype), (None if bias is None else bias.full_tensor())


class DistillationTrainer(trl.DistillationTrainer):
    """`trl.DistillationTrainer` whose loss is ours (see the module's docstring): `loss=` and
    `loss_options=` choose the objective; every other argument is TRL's."""

    _hpd_seed = _HFDistillationTrainer._hpd_seed   # the hf trainer's seeds: (training) step, micro-batch

    def __init__(self, model, teacher_model=None, args=None, *trl_args, loss=None, loss_options=None, **trl_kwargs):
        defaults = trl.DistillationConfig
        beta = defaults.beta if args is None else args.beta
        temperature = defaults.temperature if args is None else args.temperature
        self.objective, self.loss_options = _objective(loss, loss_options or {}, beta, temperature)
        self.seed = self.loss_options.pop("seed", None)
        # TRL refuses a teacher with a vocabulary of another size; the losses take it: prepare it here.
        own_teacher, vocabularies = None, (_vocab_size(model), _vocab_size(teacher_model))
        if None not in vocabularies and vocabularies[0] != vocabularies[1]:
            teacher_model, own_teacher = None, teacher_model
        super().__init__(model, teacher_model, args, *trl_args, **trl_kwargs)
        if own_teacher is not None:
            self.teacher_model = (prepare_deepspeed(own_teacher, self.accelerator) if self.is_deepspeed_enabled
                                  else self.accelerator.prepare_model(own_teacher, evaluation_mode=True))
        if self.seed is None:
            self.seed = self.args.seed
        # A logit scale or soft cap that cannot be applied is an error now, not after a generation.
        logit_map_arguments(self.accelerator.unwrap_model(self.model).config,
                            self.accelerator.unwrap_model(self.teacher_model).config)
        self._micro_step = (-1, 0)     # training: (global_step, micro-batches seen in it)
        self._evaluation_batches = 0   # batches of the evaluation under way

    def evaluation_loop(self, *args, **kwargs):
        self._evaluation_batches = 0   # every evaluation draws the same seeds
        return super().evaluation_loop(*args, **kwargs)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """TRL's `_compute_loss` with our loss: `(loss, entropy_sum, n_valid)` of this micro-batch."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"] * inputs["tool_mask"] if "tool_mask" in inputs \
            else inputs["completion_mask"]
        keep = inputs["completion_ids"].size(1)
        extra = {key: inputs[key] for key in _MULTIMODAL_KEYS if key in inputs}
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, keep, **extra)
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():   # through the teacher's wrapper too, so FSDP / DeepSpeed gather its shards
            teacher_hidden = self._forward_redirection(self.teacher_model, teacher, self._get_last_hidden_state,
                                                       teacher, input_ids, attention_mask, keep, **extra)
        student_head, teacher_head = unwrapped_student.get_output_embeddings(), teacher.get_output_embeddings()
        device = student_head.weight.device
        if teacher_head.weight.device != device:
            raise ValueError(f"the student's lm_head is on {device}, the teacher's on {teacher_head.weight.device}: "
                             f"place both on the same device (device_map)")
        student_hidden, teacher_hidden = student_hidden.to(device), teacher_hidden.to(device)
        kept = loss_mask.to(device) != 0
        # Hidden state k predicts completion token k (see the module's docstring). A divergence
        # without the hard-label term reads no label: every kept row counts, as in TRL.
        ids = inputs["completion_ids"].to(device)
        if self.objective != HPD and not self.loss_options["ce_weight"]:
            ids = torch.zeros_like(ids)
        labels = ids.masked_fill(~kept, _IGNORE)
        # The models' logit scales and soft caps, read on their (text) configs as TRL reads them.
        maps = logit_map_arguments(unwrapped_student.config, teacher.config)
        loss, entropy = self._loss(student_hidden, _whole(student_head.weight, student_head.bias, student_hidden.dtype),
                                   teacher_hidden, _whole(teacher_head.weight, teacher_head.bias, teacher_hidden.dtype),
                                   labels, maps, self._hpd_seed(unwrapped_student.training))
        n_valid = kept.sum()
        if num_items_in_batch is None:
            loss = loss / n_valid.clamp(min=1)
        else:
            loss = loss / (num_items_in_batch.to(device) if isinstance(num_items_in_batch, torch.Tensor)
                           else num_items_in_batch)
        # TRL logs the student's mean entropy (of the q the loss uses) from the sum over kept rows.
        return loss, entropy.sum().detach(), n_valid

    def _loss(self, student_hidden, student_head, teacher_hidden, teacher_head, labels, maps, seed):
        """`(summed loss, student entropy per row)` of the kept rows (0 on the others); HPD's
        `y_hat != y` rate and the data's cross-entropy (HPD, or with `ce_weight`: where labels are
        the completion ids) go to TRL's metrics, rank-local means, logged beside its entropy."""
        (student_weight, student_bias), (teacher_weight, teacher_bias) = student_head, teacher_head
        reports_ce = self.objective == HPD or bool(self.loss_options["ce_weight"])
        options = dict(self.loss_options, temperature=self.temperature, student_bias=student_bias,
                       teacher_bias=teacher_bias, return_entropy=True, return_parts=reports_ce, **maps)
        metrics = self._metrics["train" if self.model.training else "eval"]   # TRL's own rule
        if self.objective == HPD:
            loss, details, parts, entropy = fused_linear_hybrid_kl_loss(
                student_hidden, student_weight, teacher_hidden, teacher_weight, labels, seed=seed,
                return_details=True, **options)
            metrics["mismatch_rate"].append(details.mismatch_rate.item())
        else:
            loss, *rest = fused_linear_divergence_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                       labels, divergence=self.objective, **options)
            parts, entropy = rest if reports_ce else (None, rest[0])
        if parts is not None:   # this rank's mean over its rows in the loss (the part is a sum here)
            count = (labels != _IGNORE).sum().clamp(min=1)
            metrics["cross_entropy"].append((parts.cross_entropy / count).item())
        return loss, entropy
