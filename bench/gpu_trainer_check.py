"""GPU check of the trainer: a few HPD steps with bf16 autocast and the Triton losses against fp32.

    python -m bench.gpu_trainer_check                 # prints PASS or FAIL; exit 0 on PASS
    python -m bench.gpu_trainer_check --device cpu --steps 6   # on a CPU (bench/gpu_check.sh's dry run)
    python -m bench.gpu_trainer_check --json trainer.json      # also every step's loss and time (bench/gpu_report.py)

On a CPU the loss backend is "auto": Triton's interpreter under TRITON_INTERPRET=1, else the
torch backend.
"""

import argparse
import json
import sys

import torch

from hpd_kernels.models import DecoderConfig, DecoderLM
from hpd_kernels.training.trainer import TrainConfig, train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per precision (at least 6)")
    parser.add_argument("--json", help="also write every step's loss, time and peak memory here")
    args = parser.parse_args(argv)
    if args.steps < 6:
        parser.error("--steps must be at least 6: the check compares the first 5 steps, then the last")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch; use --device cpu")
    backend = "triton" if args.device == "cuda" else "auto"
    examples = [([3, 4, 5, 6], [6, 5, 4, 3, 1]), ([7, 8, 9], [9, 8, 7, 1])] * 64
    losses, steps = {}, {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        teacher = DecoderLM(DecoderConfig(vocab_size=32, hidden_size=64, num_layers=2, num_heads=2)).to(args.device)
        student = DecoderLM(DecoderConfig(vocab_size=32, hidden_size=32, num_layers=1, num_heads=2)).to(args.device)
        config = TrainConfig(objective="hpd", steps=args.steps, batch_size=16, precision=precision, backend=backend,
                             on_policy_fraction=0.25, max_new_tokens=6)
        history = train(config, student, teacher, examples, eos_id=1, progress=False, log=None)
        losses[precision] = [record["loss"] for record in history]
        steps[precision] = [{key: record.get(key) for key in ("step", "loss", "step_time_s", "tokens_per_s",
                                                               "peak_memory_mb")} for record in history]
        if args.json:  # after each precision: a run cut short by its time limit still leaves the first
            _write(args.json, args.device, backend, steps, None, None)
        print(f"{precision}: loss {losses[precision][0]:.4f} -> {losses[precision][-1]:.4f}, "
              f"peak {history[-1]['peak_memory_mb']:.1f} MiB")
    # bf16 keeps 8 bits of mantissa: the first steps' losses agree to a few percent, not exactly.
    gap = max(abs(a - b) / max(abs(a), 1e-3) for a, b in zip(losses["fp32"][:5], losses["bf16"][:5]))
    passed = gap < 0.1 and losses["bf16"][-1] < losses["bf16"][0]
    print(f"{'PASS' if passed else 'FAIL'} bf16 against fp32 on {args.device} (backend {backend}): "
          f"relative loss gap {gap:.3g} over the first 5 steps")
    if args.json:
        _write(args.json, args.device, backend, steps, passed, gap)
    return 0 if passed else 1


def _write(path, device, backend, steps, passed, gap):
    with open(path, "w") as handle:
        json.dump({"device": device, "backend": backend, "passed": passed, "relative_loss_gap_first_5": gap,
                   "steps": steps}, handle, indent=1)


if __name__ == "__main__":
    sys.exit(main())
