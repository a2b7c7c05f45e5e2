"""Where runs live on disk: an output directory claimed for one config, and the cache of trained
teachers shared by every run (keyed by everything that determines the teacher).

A directory that holds a run of another config is refused, never overwritten; one that holds a
run of this config on the same data is continued, and one whose data changed under the same path
is refused (`data.json` records the data's digests when the directory is created). One process
at a time: the output directory is locked for the whole invocation (`lock_output_dir`), and a
teacher being trained into the cache is locked while it trains, so a second run that needs it
waits and then reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from . import distributed
from ..digests import file_sha256
from .checkpoint import CheckpointError, load_model, save_model
from .config import ASSETS, ConfigError, train_config
from .data import DataError
from .evaluation import evaluate_model
from .jsonfiles import write_json_atomic, writing
from .locks import LOCK_NAME, lock_directory
from .trainer import train


def default_cache_dir():
    return os.environ.get("HPD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hpd-kernels")


def _check_not_foreign(out_dir):
    # config.json, written last when a directory is claimed, marks a run directory; the lock and
    # data.json (written just before it) may be there without it after a kill.
    ignored = {LOCK_NAME, "data.json"}
    entries = [entry for entry in os.listdir(out_dir) if entry not in ignored] if os.path.isdir(out_dir) else []
    if entries and not os.path.exists(os.path.join(out_dir, "config.json")):
        raise ConfigError(f"{out_dir} exists and is not a run directory of hpd distill; choose another --out "
                          f"directory: nothing in it was changed")


def lock_output_dir(out_dir, command):
    """The exclusive lock of `out_dir` for this invocation (a `DirectoryLock`: release it, or use
    it in a `with`); another process holding it is a `LockedError` naming it. A directory that is
    not a run directory is refused before anything is written into it."""
    _check_not_foreign(out_dir)
    return lock_directory(out_dir, command=command)


def claim_output_dir(out_dir, config, data=None):
    """Create `out_dir` for `config` (recording `data`, a `Workload.fingerprint()`), or accept it
    when it already holds a run of this config on the same data. Returns whether it did (a run to
    continue)."""
    path, data_path = os.path.join(out_dir, "config.json"), os.path.join(out_dir, "data.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8-sig") as handle:
            saved = json.load(handle)
        changed = _differences(_portable(saved), _portable(json.loads(json.dumps(config))))
        if changed:
            raise ConfigError(f"{out_dir} holds a run of another config (differs in {changed}); choose another "
                              f"--out directory: nothing in {out_dir} was changed")
        if data is not None and os.path.exists(data_path):
            with open(data_path) as handle:
                _check_same_data(out_dir, json.load(handle), data)
        elif data is not None:  # a run directory from before data digests were recorded
            write_json_atomic(data_path, data)
        return True
    _check_not_foreign(out_dir)
    with writing(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    if data is not None:
        write_json_atomic(data_path, data)
    write_json_atomic(path, config)
    return False


def _portable(value):
    """`value` (a config) with every path to one of the package's own assets named by the asset, not
    by where the package lies: a run directory stays the same run when the package moves (another
    checkout, another environment). An asset's bytes are checked against its recorded sha256 when
    it is loaded, wherever it lies."""
    if isinstance(value, dict):
        return {key: _portable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_portable(item) for item in value]
    if isinstance(value, str):
        parts = os.path.normpath(value).split(os.sep)
        if parts[-4:-1] == ["hpd_kernels", "training", "assets"] and os.path.isfile(os.path.join(ASSETS, parts[-1])):
            return f"<hpd_kernels assets>/{parts[-1]}"
    return value


def _differences(saved, config, prefix=""):
    """The dotted keys at which two configs differ, down to the first level where one is not a dict."""
    changed = []
    for key in sorted(set(saved) | set(config)):
        old, new = saved.get(key), config.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key}")
    return changed


def _check_same_data(out_dir, saved, data):
    refuse = (f"; use another --out directory for the new data (or restore the old): nothing in {out_dir} "
              f"was changed")
    for file, digest in saved.get("files", {}).items():
        if data["files"].get(file) != digest:
            raise DataError(f"{file} changed since the run in {out_dir} started (its sha256 differs from the one "
                            f"recorded in data.json){refuse}")
    for key, what in (("examples_sha256", "training examples"), ("eval_sha256", "evaluation problems")):
        if key in saved and saved[key] != data.get(key):
            raise DataError(f"the {what} differ from those the run in {out_dir} started with (the task, tokenizer "
                            f"or data changed){refuse}")


def _digest(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def prepare_teacher(model, config, workload, cache_dir, log):
    """`(teacher, its evaluation or None)`: the teacher's weights as given, or trained with sft and
    cached under `cache_dir` (with its evaluation)."""
    section = config["teacher"]
    if "train" not in section or section.get("checkpoint"):
        model.eval().requires_grad_(False)
        return model, None
    # The model it starts from: a decoder's sizes (as before: cached decoder teachers keep their key),
    # or a Hugging Face model (`hf`/`gguf`, `num_layers`) fine-tuned with sft.
    model_keys = {key: section[key] for key in ("decoder", "hf", "gguf", "num_layers") if key in section}
    identity = {**model_keys, "train": section["train"], "data": workload.identity,
                "tokenizer": workload.tokenizer.describe(), "eval": config["eval"], "format": 1}
    if distributed.world_size() > 1:  # batch_size is per rank: another world size trains another teacher
        identity["world_size"] = distributed.world_size()
    key = _digest(identity)
    folder = os.path.join(cache_dir, f"teacher-{key}")
    weights, info_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "info.json")
    # Rank 0 locks the teacher's folder (waiting while another run trains this teacher) and decides
    # for every rank whether it is cached.
    lock = lock_directory(folder, wait=True, on_wait=lambda text: log(f"teacher: {text}"),
                          command="teacher training") if distributed.is_main() else None
    try:
        cached = distributed.broadcast_object(os.path.isfile(weights) and os.path.isfile(info_path))
        if cached:
            with open(info_path) as handle:
                info = json.load(handle)
            if info.get("weights_sha256") and file_sha256(weights) != info["weights_sha256"]:
                raise CheckpointError(f"{weights} does not match the sha256 checksum recorded when it was written "
                                      f"(the file is damaged or was changed); delete {folder} to train it again")
            load_model(model, weights)
            log(f"teacher: reusing {folder}")
        else:
            how = "training from scratch" if "decoder" in section else "fine-tuning"
            log(f"teacher: {how} with sft ({section['train']['steps']} steps), cached in {folder}")
            started = time.perf_counter()
            history = train(train_config(section["train"], "config", "teacher.train"), model, None, workload.examples,
                            run_dir=os.path.join(folder, "run"), label="teacher sft", **workload.train_options(log))
            info = None
            if distributed.is_main():  # under torchrun every rank trained (DDP); rank 0 writes the cache
                info = {"evaluation": evaluate_model(model, workload, config["eval"]),
                        "train_seconds": time.perf_counter() - started, "final_train_metrics": history[-1]}
                save_model(model, weights, metadata={"config": json.dumps(section)})
                info["weights_sha256"] = file_sha256(weights)
                write_json_atomic(info_path, info)  # last: the teacher is cached once this exists
            info = distributed.broadcast_object(info)
    finally:
        if lock is not None:
            lock.release()
    model.eval().requires_grad_(False)
    return model, info["evaluation"]
