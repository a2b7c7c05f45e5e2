"""A thin adapter that gives Hugging Face `transformers` causal LMs the trainer's model interface.

The trainer and the sampler need three things of a model: `model(input_ids, attention_mask=,
cache=)` returning the final hidden states, `model.lm_head` (an `nn.Linear` without bias), and
`model.new_cache(batch, max_length)`. `HFCausalLM` wraps any `AutoModelForCausalLM` whose logits
are `lm_head(hidden)` up to a logit map (Llama, Qwen2, Mistral, Gemma, ...): it runs the base model only, so the
fused-linear losses see hidden states and the `[tokens, vocab]` logits are never built.
Models that transform their logits after the lm_head (a logit scale, Gemma's soft cap:
`logit_post_processing`) keep it as `logit_map`, which `models.output_logits` applies and the
losses take as their logit maps.

Weights are read from safetensors files only, never from pickles (`pytorch_model.bin`, written by
`torch.save`): unpickling a file runs whatever code it names, and a model folder or hub repository
is not code one has read. A local folder whose weights are pickles only is refused with the file
named (`check_no_pickles`); a hub id is fetched with `use_safetensors=True`.
"""

from __future__ import annotations

import inspect
import math
import os

import torch
from torch import nn

# Where configs keep a multiplier of the logits, in the order TRL's DistillationTrainer reads them:
# Cohere's `logit_scale`, Muse Glimmer's `output_multiplier`, Falcon-H1's `lm_head_multiplier`, and
# `logits_scaling`, which Granite and MiniCPM3 divide by and HyperCLOVA X multiplies by.
_LOGIT_MULTIPLIERS = ("logit_scale", "output_multiplier", "lm_head_multiplier")


def _config_number(config, name, value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{type(config).__name__}.{name}={value!r}: {what} must be a finite number > 0 to be "
                         f"applied to the logits")
    return float(value)


def logit_post_processing(config):
    """`(scale, softcap)`: what a model does to `lm_head(hidden)` before its softmax, read from its
    (text) config as TRL's DistillationTrainer reads it: `softcap * tanh(scale * z / softcap)`, softcap
    None where the model does not cap. Pass them to a loss as `student_logit_scale` /
    `student_softcap` (or the teacher's). A value that cannot be applied is a one-line error."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    for name in _LOGIT_MULTIPLIERS:
        value = getattr(config, name, None)
        if value is not None:
            scale = _config_number(config, name, value, "a logit multiplier")
            break
    else:
        value = getattr(config, "logits_scaling", None)
        if value is not None:
            value = _config_number(config, "logits_scaling", value, "a logit scaling")
            scale = value if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / value
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        softcap = _config_number(config, "final_logit_softcapping", softcap, "a soft cap")
    return scale, softcap


def logit_map_arguments(student_config, teacher_config) -> dict:
    """The loss keywords of both models' `logit_post_processing`."""
    student_scale, student_softcap = logit_post_processing(student_config)
    teacher_scale, teacher_softcap = logit_post_processing(teacher_config)
    return dict(student_logit_scale=student_scale, student_softcap=student_softcap,
                teacher_logit_scale=teacher_scale, teacher_softcap=teacher_softcap)
# The weight files transformers looks for in safetensors, and the endings of files that torch.save
# (pickle) writes: PyTorch's pytorch_model.bin and its shards, and the other usual names.
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_ENDINGS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_no_pickles(path):
    """Refuse (`ValueError`, one line naming the file) a local model folder `path` whose weights are
    pickles only. A hub id (no such folder) passes: its download is restricted to safetensors."""
    if not os.path.isdir(path):
        return
    names = os.listdir(path)
    if any(name in SAFETENSORS_WEIGHTS for name in names):
        return
    pickles = sorted((name for name in names if name.endswith(PICKLE_ENDINGS)),
                     key=lambda name: (name != "pytorch_model.bin", name))
    if pickles:
        raise ValueError(f"{os.path.join(path, pickles[0])} holds pickled weights (torch.save), and unpickling a file "
                         f"runs whatever code it names: models are loaded from safetensors only, and {path} has no "
                         f"model.safetensors; convert it once where the file is trusted: "
                         f"AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder) writes one")


class HFCache:
    """The `past_key_values` of a Hugging Face model, grown by each call."""

    def __init__(self):
        self.past = None
        self.length = 0


class HFCausalLM(nn.Module):
    def __init__(self, model):
        super().__init__()
        lm_head = model.get_output_embeddings()
        if not isinstance(lm_head, nn.Linear):
            raise TypeError(f"{type(model).__name__}: the output embedding is a {type(lm_head).__name__}, "
                            f"expected an nn.Linear lm_head")
        if lm_head.bias is not None:
            raise ValueError(f"{type(model).__name__}: an lm_head with a bias is not supported")
        # What the model does to lm_head(hidden) (a logit scale, Gemma's soft cap): `models.output_logits`
        # applies it, the losses take it as their logit maps.
        self.logit_map = logit_post_processing(model.config)
        self.model = model
        self.config = model.config
        self.lm_head = lm_head

    @classmethod
    def from_pretrained(cls, path, num_layers=None, **kwargs):
        """The model in `path` (a folder or hub id); `num_layers` keeps its first N decoder layers
        only (the embeddings, final norm and lm_head, tied or not as the model has them, are kept):
        a smaller student that shares the teacher's tokenizer. The other layers' weights are not
        loaded. Weights come from safetensors files only (see the module's docstring)."""
        if kwargs.get("use_safetensors", True) is not True:
            raise ValueError(f"use_safetensors={kwargs['use_safetensors']!r}: models are loaded from safetensors "
                             f"only (unpickling a file runs whatever code it names)")
        check_no_pickles(path)
        kwargs["use_safetensors"] = True
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError as error:
            raise ImportError("Hugging Face models need the `hf` extra: pip install 'hpd-kernels[hf]'") from error
        if num_layers is None:
            return cls(AutoModelForCausalLM.from_pretrained(path, **kwargs))
        config = AutoConfig.from_pretrained(path)
        total = getattr(config, "num_hidden_layers", None)
        if not isinstance(total, int):
            raise ValueError(f"{type(config).__name__} has no num_hidden_layers: it cannot be truncated")
        if not 1 <= num_layers <= total:
            raise ValueError(f"num_layers={num_layers} is not in [1, {total}]: the model has {total} layers")
        config.num_hidden_layers = num_layers
        for name in ("layer_types",):  # per-layer lists (sliding or full attention, ...) follow the layers
            if isinstance(getattr(config, name, None), list):
                setattr(config, name, getattr(config, name)[:num_layers])
        # The dropped layers' weights are "unexpected" to transformers, which would print a table
        # of them; that is the point here, so its loading log is quieted for this load.
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = cls(AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs))
        finally:
            hf_logging.set_verbosity(verbosity)
        layers = getattr(model.model.base_model, "layers", None)
        if layers is not None and len(layers) != num_layers:
            raise ValueError(f"{type(model.model).__name__}: asked for {num_layers} layers, got {len(layers)}")
        return model

    @property
    def vocab_size(self):
        return self.lm_head.weight.shape[0]

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: HFCache | None = None):
        """Final hidden states `[batch, seq, hidden]`; `attention_mask` covers the cached prefix
        and the new tokens (1 = real token), so left-padded prompts are handled."""
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long,
                                        device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        # transformers 5.x renamed `past_key_values` to `cache` (in arguments and outputs).
        cache_argument = "cache" if "cache" in inspect.signature(self.model.base_model.forward).parameters \
            else "past_key_values"
        outputs = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                        use_cache=cache is not None,
                                        **({cache_argument: cache.past} if cache is not None else {}))
        if cache is not None:
            cache.past = outputs[cache_argument]
            cache.length += input_ids.shape[1]
        return outputs.last_hidden_state

    def new_cache(self, batch_size, max_length):
        return HFCache()
