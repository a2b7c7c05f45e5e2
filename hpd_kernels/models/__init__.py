"""Models the trainer can distil: a small built-in decoder (plain PyTorch), and Hugging Face
causal LMs through `HFCausalLM` (the `hf` extra).

A model gives its final hidden states (`model(input_ids, ...)`), its `lm_head` and, where its
logits are not `lm_head(hidden)` itself, `logit_map = (scale, softcap)`: its logits are
`softcap * tanh(scale * lm_head(hidden) / softcap)` (`registry.LogitMaps`' rule). `output_logits`
is the one place that turns hidden states into a model's logits; the losses take the map instead.
"""

from ..ops.common import map_logits
from .decoder import DecoderConfig, DecoderLM, KVCache  # noqa: F401
from .hf import HFCausalLM  # noqa: F401  (imports transformers only when loading a model)

IDENTITY_MAP = (1.0, None)


def logit_map(model):
    """`(scale, softcap)` of `model`'s logits (`(1.0, None)`: the lm_head's output itself)."""
    return getattr(model, "logit_map", IDENTITY_MAP)


def output_logits(model, hidden):
    """`model`'s logits of `hidden`: its lm_head, then its logit map."""
    scale, softcap = logit_map(model)
    return map_logits(model.lm_head(hidden), scale, softcap or 0.0)


def loss_maps(student, teacher=None) -> dict:
    """The losses' keywords for the two models' logit maps."""
    student_scale, student_softcap = logit_map(student)
    teacher_scale, teacher_softcap = logit_map(teacher) if teacher is not None else IDENTITY_MAP
    return dict(student_logit_scale=student_scale, student_softcap=student_softcap,
                teacher_logit_scale=teacher_scale, teacher_softcap=teacher_softcap)
