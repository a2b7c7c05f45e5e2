"""`TrainConfig`: the options of one training run, with their defaults and meaning."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

from .. import schema


@dataclass
class TrainConfig:
    """Options of one training run (`hpd distill --help` lists them with their meaning)."""

    objective: str = "hpd"          # sft, fkl, rkl, jsd, skl, srkl, tvd or hpd
    # sft's targets: data (the data's tokens) or teacher_sample (at every position, one token drawn from the
    # teacher's next-token distribution at `temperature`: a one-sample estimate of the forward KL's gradient)
    labels: str = "data"
    steps: int = 100                # optimiser steps
    batch_size: int = 16            # sequences per micro-batch
    grad_accum: int = 1             # micro-batches per optimiser step
    lr: float = 3e-3                # peak learning rate
    min_lr_ratio: float = 0.1       # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10          # linear warmup
    schedule: str = "cosine"        # after the warmup: cosine (decays to lr * min_lr_ratio) or constant (lr)
    weight_decay: float = 0.0       # AdamW
    max_grad_norm: float = 1.0      # gradient clipping (0: off)
    temperature: float = 1.0        # distillation temperature
    fkl_weight: float = 1.0         # HPD: weight of the forward-KL term on the data token
    rkl_weight: float = 1.0         # HPD: weight of the reverse-KL term on the sampled token
    beta: float = 0.5               # JSD mixture weight
    alpha: float = 0.1              # skew KL mixture weight
    ce_weight: float = 0.0          # an extra cross-entropy term on the data tokens
    on_policy_fraction: float = 0.0  # fraction of batches whose responses the student generates
    rollout_temperature: float = 1.0
    rollout_top_p: float = 1.0
    max_new_tokens: int = 0         # rollout length (0: the longest response in the data)
    precision: str = "auto"         # auto (bf16 autocast on CUDA, fp32 elsewhere), fp32 or bf16
    eval_every: int = 0             # steps between evaluations (0: only at the end)
    save_every: int = 0             # steps between checkpoints (0: only at the end)
    strategy: str = "ddp"           # under torchrun: ddp (replicated student) or fsdp (FSDP2 fully_shard)
    seed: int = 0
    backend: str = "auto"           # loss backend: auto, triton or torch

    def __post_init__(self):  # the types and ranges of every field: schema.TRAIN; then the rules between fields
        values = asdict(self)
        schema.TRAIN.check(values, "TrainConfig", "")
        _check_rules(values, "TrainConfig", "")

    @classmethod
    def from_dict(cls, values, source="TrainConfig", path=""):
        """A config from a mapping, checked by the schema; an error (`ConfigError`) names `source`,
        the key under `path` and what is expected."""
        schema.TRAIN.check(values, source, path)
        defaults = {field.name: field.default for field in fields(cls) if field.default is not MISSING}
        _check_rules({**defaults, **values}, source, path)
        return cls(**values)

    def to_dict(self):
        return asdict(self)


def _check_rules(values, source, path):
    """The rules between fields (each field is already checked alone), naming the key under `path`."""
    if values["labels"] == "teacher_sample" and values["objective"] != "sft":
        key = f"{path}.labels" if path else "labels"
        raise schema.ConfigError(f"{source}: {key}: teacher_sample replaces the targets of objective sft, but "
                                 f"objective is {values['objective']!r} (its teacher enters through the objective "
                                 f"itself): use objective sft, or labels data")
