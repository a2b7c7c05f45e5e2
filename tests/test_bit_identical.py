"""A fixed set of calls gives the very same bits as when `tests/data/fixed_calls.safetensors` was written.

For refactors that must change no result (issue 21: the backend contract, the torch backend's split,
named results): every objective, both backends, from logits and from hidden states, the loss, every
student gradient and HPD's drawn `y_hat`, on one small problem with ignored rows, a larger teacher
vocabulary and T != 1. Bit-identical (`torch.equal`) on a machine like the one that wrote the file
(the same torch version and CPU capability: the CPU kernels' vector width decides how sums are
ordered); elsewhere the results are still held to float32 rounding (rtol 1e-5), since another vector
width may order a sum differently without any change of ours.

Regenerate only when a result is meant to change, and say so in the commit:
`TRITON_INTERPRET=1 .venv/bin/python tests/test_bit_identical.py --write`.
"""

import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

import hpd_kernels
from hpd_kernels.registry import DIVERGENCES

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "fixed_calls.safetensors")
BACKENDS = ("torch", "triton")
MIXTURE = {"jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
ROWS, VOCAB, TEACHER_VOCAB, STUDENT_HIDDEN, TEACHER_HIDDEN, TEMPERATURE = 40, 300, 310, 16, 24, 0.7


def _problem():
    generator = torch.Generator().manual_seed(21)
    randn = lambda *shape: torch.randn(*shape, generator=generator)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    labels[:18] = -100   # a run of prompt rows the backends skip, and a few ignored rows after it
    labels[25] = labels[31] = -100
    return dict(student_logits=randn(ROWS, VOCAB) * 2, teacher_logits=randn(ROWS, TEACHER_VOCAB) * 2, labels=labels,
                student_hidden=randn(ROWS, STUDENT_HIDDEN), student_weight=randn(VOCAB, STUDENT_HIDDEN) * 0.5,
                teacher_hidden=randn(ROWS, TEACHER_HIDDEN), teacher_weight=randn(TEACHER_VOCAB, TEACHER_HIDDEN) * 0.5)


def _leaf(tensor):
    return tensor.detach().clone().requires_grad_(True)


def _logits_call(objective, backend, problem):
    student = _leaf(problem["student_logits"])
    kwargs = dict(temperature=TEMPERATURE, backend=backend, **MIXTURE.get(objective, {}))
    if objective == "hpd":
        loss, details = hpd_kernels.hybrid_kl_loss(student, problem["teacher_logits"], problem["labels"], seed=7,
                                                   return_details=True, **kwargs)
        extra = {"sampled_ids": details.sampled_ids}
    else:
        loss, extra = hpd_kernels.divergence_loss(student, problem["teacher_logits"], problem["labels"],
                                                  divergence=objective, **kwargs), {}
    loss.backward()
    return {"loss": loss.detach(), "grad_student_logits": student.grad, **extra}


def _fused_linear_call(objective, backend, problem):
    hidden, weight = _leaf(problem["student_hidden"]), _leaf(problem["student_weight"])
    args = (hidden, weight, problem["teacher_hidden"], problem["teacher_weight"], problem["labels"])
    kwargs = dict(temperature=TEMPERATURE, backend=backend, **MIXTURE.get(objective, {}))
    if objective == "hpd":
        loss, details = hpd_kernels.fused_linear_hybrid_kl_loss(*args, seed=7, return_details=True, **kwargs)
        extra = {"sampled_ids": details.sampled_ids}
    else:
        loss, extra = hpd_kernels.fused_linear_divergence_loss(*args, divergence=objective, **kwargs), {}
    loss.backward()
    return {"loss": loss.detach(), "grad_student_hidden": hidden.grad, "grad_student_weight": weight.grad, **extra}


def fixed_calls():
    """`{name: tensor}` of every call's outputs."""
    problem, results = _problem(), {}
    for objective in ("hpd",) + DIVERGENCES:
        for backend in BACKENDS:
            for level, call in (("logits", _logits_call), ("fused_linear", _fused_linear_call)):
                for name, tensor in call(objective, backend, problem).items():
                    results[f"{objective}/{backend}/{level}/{name}"] = tensor.detach().contiguous()
    return results


def _machine():
    return {"torch": torch.__version__.split("+")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _written_on():
    with safe_open(FIXTURE, "pt") as handle:
        return handle.metadata()


def test_the_fixed_calls_give_the_recorded_results():
    expected, actual = load_file(FIXTURE), fixed_calls()
    assert sorted(actual) == sorted(expected)
    same_machine = _written_on() == _machine()
    for name, tensor in expected.items():
        if same_machine or not tensor.is_floating_point():
            assert torch.equal(actual[name], tensor), name
        else:
            torch.testing.assert_close(actual[name], tensor, rtol=1e-5, atol=1e-7, msg=name)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit(f"usage: TRITON_INTERPRET=1 python {sys.argv[0]} --write")
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 (the triton backend runs on the CPU)")
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    save_file(fixed_calls(), FIXTURE, metadata=_machine())
    print(f"wrote {FIXTURE}")
