"""`hpd distill`: teacher, then student, end to end, from one config (see `config`).

The teacher is loaded, or trained with sft and cached; the student is warmed up, evaluated
("before"), distilled and evaluated again ("after"). Every stage writes under the output
directory and resumes from there. Under torchrun every rank trains; rank 0 evaluates and writes.
"""

from __future__ import annotations

import json
import os
import time

import torch

from . import distributed
from .checkpoint import CheckpointError, save_model
from .config import ConfigError, train_config
from .data import DataError
from .evaluation import evaluate_model, final_evaluation
from .jsonfiles import WriteError, write_json_atomic, write_text_atomic, writing
from .locks import LockedError
from .plot import plot_runs
from .rundir import claim_output_dir, default_cache_dir, lock_output_dir, prepare_teacher
from .trainer import train
from .workload import Workload, build_model


def run_distill(config, out_dir, *, cache_dir=None, log=print):
    """Teacher (loaded or trained and cached), student warm-up, distillation, evaluation; returns
    the results dict also written to `out_dir/results.json` (+ `results.md`, `distill.png`)."""
    started = time.perf_counter()
    device = choose_device(config.get("device", "auto"))
    main = distributed.is_main()
    if not main:
        log = _silent
    # Data, models and checkpoints are all checked before anything is written.
    cache_dir = cache_dir or default_cache_dir()  # trained teachers, and GGUF files converted once
    workload = Workload(config, cache_dir, log)
    workload.check_positions([config["distill"]])
    teacher = build_model(config["teacher"], workload.tokenizer, "teacher", device, cache_dir=cache_dir, log=log)
    student = build_model(config["student"], workload.tokenizer, "student", device, cache_dir=cache_dir)
    distill_config = workload.distill_config(config["distill"], "config", "distill")
    # One invocation at a time in `out_dir`: rank 0 holds its lock until this returns or raises
    # (the kernel drops it if the process is killed).
    held = []
    _on_main(lambda: held.append(lock_output_dir(out_dir, "hpd distill")))
    try:
        return _distill(config, out_dir, cache_dir, log, started, device, main, workload, teacher, student,
                        distill_config)
    finally:
        for lock in held:
            lock.release()


def _distill(config, out_dir, cache_dir, log, started, device, main, workload, teacher, student, distill_config):
    resumed = _on_main(lambda: claim_output_dir(out_dir, config, workload.fingerprint()))
    if resumed:
        log(f"{out_dir}: continuing the run found there")
    teacher, teacher_eval = prepare_teacher(teacher, config, workload, cache_dir or default_cache_dir(), log)
    evaluations_path = os.path.join(out_dir, "evaluations.json")

    def update_evaluations(key, compute):
        """Rank 0 evaluates (once: the result is kept on disk) and tells the other ranks."""
        def work():
            stored = {}
            if os.path.isfile(evaluations_path):
                with open(evaluations_path) as handle:
                    stored = json.load(handle)
            if key not in stored:
                stored[key] = compute()
                write_json_atomic(evaluations_path, stored)
            return stored
        return _on_main(work)

    evaluations = update_evaluations("teacher", lambda: teacher_eval or evaluate_model(teacher, workload, config["eval"]))
    common = workload.train_options(log)
    if config["student"].get("warmup"):
        warmup = train_config(config["student"]["warmup"], "config", "student.warmup")
        train(warmup, student, None, workload.examples, run_dir=os.path.join(out_dir, "student_warmup"),
              label="student warm-up sft", **common)
    evaluations = update_evaluations("student_before", lambda: evaluate_model(student, workload, config["eval"], teacher))
    history = train(distill_config, student, teacher, workload.examples, run_dir=os.path.join(out_dir, "distill"),
                    evaluate=lambda model, step: evaluate_model(model, workload, config["eval"], teacher),
                    label=f"student {distill_config.objective}", **common)
    if not main:  # rank 0 evaluates and writes the results
        distributed.barrier()
        return None
    evaluations["student_after"] = final_evaluation(history)
    write_json_atomic(evaluations_path, evaluations)
    save_model(student, os.path.join(out_dir, "student.safetensors"),
               metadata={"config": json.dumps(config["student"])})
    before = {"step": 0, **{f"eval_{key}": value for key, value in evaluations["student_before"].items()}}
    with writing(os.path.join(out_dir, "distill.png")):
        plot_runs({f"student ({distill_config.objective})": [before] + history},
                  os.path.join(out_dir, "distill.png"), title=f"hpd distill: {distill_config.objective}")
    results = {"objective": distill_config.objective, "evaluations": evaluations, "device": str(device),
               "world_size": distributed.world_size(),
               "seconds_this_invocation": time.perf_counter() - started,
               "distill_step_time_s": sum(r["step_time_s"] for r in history) / len(history),
               "distill_peak_memory_mb": max(r["peak_memory_mb"] for r in history)}
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    table = results_table(evaluations, distill_config.objective)
    write_text_atomic(os.path.join(out_dir, "results.md"), table + "\n")
    distributed.barrier()
    return results


def _silent(*_):
    pass


def choose_device(choice):
    """This process's device: under torchrun, the local rank's GPU (or the CPU)."""
    if distributed.launched_by_torchrun():
        device = distributed.setup_from_env()
        return device if choice in ("auto", "cuda") or device.type == "cpu" else torch.device(choice)
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice)


def _on_main(work):
    """Run `work()` on rank 0 only and hand its result (or its error) to every rank. Any error is
    handed on, not only a user's: the other ranks would otherwise wait forever in the broadcast.
    Rank 0 raises its own exception; the others a user error's class, or RuntimeError naming it."""
    result, error, unexpected = None, None, None
    if distributed.is_main():
        try:
            result = work()
        except (ConfigError, DataError, CheckpointError, LockedError, WriteError) as caught:
            error = (type(caught).__name__, str(caught))
        except Exception as caught:  # noqa: BLE001 - re-raised below, after the other ranks know
            unexpected = caught
            error = ("RuntimeError", f"rank 0 failed: {type(caught).__name__}: {caught}")
    result, error = distributed.broadcast_object((result, error))
    if unexpected is not None:
        raise unexpected
    if error is not None:
        raise {"ConfigError": ConfigError, "DataError": DataError, "CheckpointError": CheckpointError,
               "LockedError": LockedError, "WriteError": WriteError, "RuntimeError": RuntimeError}[error[0]](error[1])
    return result


def results_table(evaluations, objective):
    rows = [("teacher", "teacher"), ("student before", "student_before"), (f"student after {objective}", "student_after")]
    columns = [("greedy acc", "greedy_accuracy", "{:.1%}"), ("sampled acc", "sampled_accuracy", "{:.1%}"),
               ("held-out CE", "heldout_ce", "{:.3f}"), ("FKL to teacher", "fkl_to_teacher", "{:.3f}"),
               ("RKL to teacher", "rkl_to_teacher", "{:.3f}")]
    lines = ["| model | " + " | ".join(name for name, _, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for label, key in rows:
        values = evaluations.get(key, {})
        cells = [fmt.format(values[field]) if field in values else "-" for _, field, fmt in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
