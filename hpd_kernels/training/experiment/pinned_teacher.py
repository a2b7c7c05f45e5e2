"""How the default experiment's committed teacher was made (`scripts/pin_teacher.py`)."""

from __future__ import annotations

import json
import os

import torch

from ..checkpoint import record_sha256, save_model
from ..config import train_config
from ..trainer import train
from ..workload import Workload, build_model
from .settings import PINNED_TEACHER, TEACHER_DECODER, TEACHER_RECIPE, load_experiment_from_base


def train_pinned_teacher(path=PINNED_TEACHER, log=print):
    """Train the default experiment's teacher by `TEACHER_RECIPE` in one CPU thread, and write it
    to `path` (with its recipe, and its evaluation on the test problems, in the metadata) and its
    sha256 beside it: how the committed teacher was made (`scripts/pin_teacher.py`). One thread
    makes it independent of the core count; another CPU architecture may still round differently."""
    from ..evaluation import evaluate_model
    from .teacher_data import one_thread

    experiment = load_experiment_from_base(teacher={"decoder": TEACHER_DECODER, "train": TEACHER_RECIPE})
    base = experiment["base"]
    workload = Workload(base)
    teacher = build_model(base["teacher"], workload.tokenizer, "teacher", torch.device("cpu"))
    with one_thread():
        train(train_config(TEACHER_RECIPE, "TEACHER_RECIPE", "teacher.train"), teacher, None, workload.examples,
              label="pinned teacher sft", **workload.train_options(log))
        evaluation = evaluate_model(teacher, workload, base["eval"])
    log(f"pinned teacher: {evaluation}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_model(teacher, path, metadata={"decoder": json.dumps(TEACHER_DECODER), "recipe": json.dumps(TEACHER_RECIPE),
                                        "task": json.dumps(base["task"]), "evaluation": json.dumps(evaluation)})
    record_sha256(path)
    return evaluation
