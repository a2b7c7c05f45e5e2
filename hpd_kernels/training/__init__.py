"""Distillation training on top of the library's losses, and the `hpd distill` and `hpd experiment`
commands built on it. `criteria` turns each objective into a call of the fused-linear losses;
`trainer` is the training loop (`TrainConfig`, `train`), with `checkpoint` (safetensors
checkpoints), `distributed` (torchrun and DDP) and `fsdp` (FSDP2); `data` and `task` give the
tokenizers and examples (user files, or the built-in addition task). `config` reads, merges and
checks a run's config; `workload` builds its data and models; `evaluation` scores a model;
`rundir` claims output directories and caches trained teachers; `locks` keeps them to one process
at a time; `jsonfiles` writes their JSON files atomically (a refused write is a `WriteError`) and
reads metrics back; `pipeline` runs `hpd distill`; `experiment` plans and runs `hpd experiment`
(`teacher_data`: the teacher's sampled distillation set; `assets/`: its pinned teacher), and
`report` writes its table, comparisons, JSON and plots (`plot`: a run's curves).
"""

from .criteria import OBJECTIVES, distillation_loss, shifted_labels  # noqa: F401
