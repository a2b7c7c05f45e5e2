"""`python -m hpd_kernels`: a one-minute demonstration on random logits.

`python -m hpd_kernels distill|experiment ...` is the `hpd` command (so that
`torchrun --nproc-per-node 2 -m hpd_kernels distill` runs it on every rank).

Computes HPD and every divergence with the library (torch backend on the CPU, Triton on a GPU)
and with the naive reference, and prints the values side by side with the HPD details.
"""

import argparse
import sys

import torch

import hpd_kernels
from hpd_kernels import reference


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and not argv[0].startswith("-"):  # a command (the demonstration takes flags only)
        from .cli import main as hpd

        return hpd(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    student = (torch.randn(args.rows, args.vocab, device=device) * 2).requires_grad_(True)
    teacher = student.detach() + torch.randn(args.rows, args.vocab, device=device)
    labels = torch.randint(0, args.vocab, (args.rows,), device=device)
    labels[: args.rows // 8] = -100

    loss, details = hpd_kernels.hybrid_kl_loss(student, teacher, labels, seed=args.seed, return_details=True)
    loss.backward()
    expected = reference.hybrid_kl_loss(student.double(), teacher.double(), labels, details.sampled_ids.clamp(min=0))
    print(f"{args.rows} rows x {args.vocab} vocabulary on {device}")
    print(f"{'objective':<18}{'hpd_kernels':>14}{'reference (fp64)':>20}")
    print(f"{'hpd':<18}{loss.item():>14.6f}{expected.item():>20.6f}")
    references = reference.DIVERGENCE_LOSSES
    for name, fn in hpd_kernels.DIVERGENCE_LOSSES.items():
        value = fn(student.detach(), teacher, labels).item()
        print(f"{name:<18}{value:>14.6f}{references[name](student.detach().double(), teacher.double(), labels).item():>20.6f}")
    print(f"HPD: y_hat != y on {details.mismatch_rate.item():.1%} of active rows; "
          f"mean w_y {details.label_weight.mean().item():.4f}, mean w_hat {details.sample_weight.mean().item():.4f}; "
          f"grad norm {student.grad.norm().item():.4f}")


if __name__ == "__main__":
    sys.exit(main())
