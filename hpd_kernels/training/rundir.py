"""Where runs live on disk: an output directory claimed for one config, and the cache of trained
teachers shared by every run (keyed by everything that determines the teacher).

A directory that holds a run of another config is refused, never overwritten; one that holds a
run of this config is continued.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from . import distributed
from .checkpoint import load_model, save_model
from .config import ConfigError, train_config
from .evaluation import evaluate_model
from .jsonfiles import write_json_atomic
from .trainer import train


def default_cache_dir():
    return os.environ.get("HPD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hpd-kernels")


def claim_output_dir(out_dir, config):
    """Create `out_dir` for `config`, or accept it when it already holds a run of this config.
    Returns whether it did (a run to continue)."""
    path = os.path.join(out_dir, "config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8-sig") as handle:
            saved = json.load(handle)
        if saved != json.loads(json.dumps(config)):
            changed = sorted(key for key in set(saved) | set(config) if saved.get(key) != config.get(key))
            raise ConfigError(f"{out_dir} holds a run of another config (differs in {changed}); choose another "
                              f"--out directory: nothing in {out_dir} was changed")
        return True
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"{out_dir} exists and is not a run directory of hpd distill; choose another --out "
                          f"directory: nothing in it was changed")
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(path, config)
    return False


def _digest(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def prepare_teacher(model, config, workload, cache_dir, log):
    """`(teacher, its evaluation or None)`: the teacher's weights as given, or trained with sft and
    cached under `cache_dir` (with its evaluation)."""
    section = config["teacher"]
    if "train" not in section or section.get("checkpoint"):
        model.eval().requires_grad_(False)
        return model, None
    identity = {"decoder": section["decoder"], "train": section["train"], "data": workload.identity,
                "tokenizer": workload.tokenizer.describe(), "eval": config["eval"], "format": 1}
    if distributed.world_size() > 1:  # batch_size is per rank: another world size trains another teacher
        identity["world_size"] = distributed.world_size()
    key = _digest(identity)
    folder = os.path.join(cache_dir, f"teacher-{key}")
    weights, info_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "info.json")
    if os.path.isfile(weights) and os.path.isfile(info_path):
        load_model(model, weights)
        with open(info_path) as handle:
            info = json.load(handle)
        log(f"teacher: reusing {folder}")
    else:
        log(f"teacher: training from scratch with sft ({section['train']['steps']} steps), cached in {folder}")
        started = time.perf_counter()
        history = train(train_config(section["train"], "config", "teacher.train"), model, None, workload.examples,
                        run_dir=os.path.join(folder, "run"), label="teacher sft", **workload.train_options(log))
        info = None
        if distributed.is_main():  # under torchrun every rank trained (DDP); rank 0 writes the cache
            info = {"evaluation": evaluate_model(model, workload, config["eval"]),
                    "train_seconds": time.perf_counter() - started, "final_train_metrics": history[-1]}
            save_model(model, weights, metadata={"config": json.dumps(section)})
            write_json_atomic(info_path, info)
        info = distributed.broadcast_object(info)
    model.eval().requires_grad_(False)
    return model, info["evaluation"]
