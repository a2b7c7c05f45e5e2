"""Distillation training on top of the library's losses, and the `hpd distill` and `hpd experiment`
commands built on it.

- `trainer/`: the run loop (`TrainConfig`, `train`), one job a module (see its `__init__`), on top
  of `criteria` (each objective as a call of the fused-linear losses), `checkpoint` (safetensors
  models and checkpoints) and `distributed` (torchrun and DDP).
- `experiment/`: `hpd experiment`, its settings, grid of runs and runner (see its `__init__`;
  `assets/`: its pinned teacher).
- `report/`: the experiment's report: table, comparisons, JSON and plots (see its `__init__`).
- `pipeline`: `hpd distill` (`plot`: a run's curves).
- `config` reads, merges and checks a run's config against `schema` (built from `specs`); `data`
  and `task` give the tokenizers and examples (user files, or the built-in addition task);
  `workload` builds a run's data and models; `evaluation` scores a model.
- `rundir` claims output directories and caches trained teachers; `locks` keeps them to one process
  at a time; `jsonfiles` writes their JSON files atomically (a refused write is a `WriteError`) and
  reads metrics back.

`TRAINING_OBJECTIVES` are the objectives' names as the trainer takes them: `sft` and the losses'
short names (the registry's `OBJECTIVES` are the losses' full names, without `sft`).
"""

from .criteria import TRAINING_OBJECTIVES, distillation_loss, shifted_labels  # noqa: F401
