"""What the benchmarks measure: the objectives, the implementations compared, and their inputs.

Every variant is one training step's loss work, forward plus backward, built as a callable
`step() -> loss` over inputs made by `make_inputs`. The comparisons:

- `reference`: `reference/objectives.py` on float32 logits, the way the published HPD recipe
  computes it (full float32 log-softmaxes of student and teacher; for HPD, y_hat drawn with
  `torch.multinomial` from a float32 softmax of the student).
- `reference+torch.compile`: the same function through `torch.compile` (inductor).
- `hpd_kernels`: the library, `backend="auto"` (the torch backend on a CPU, Triton on CUDA).
- `liger LigerJSD`: Liger-Kernel's JSD (CUDA, JSD only). It takes log-probabilities, so the
  step includes the float32 `log_softmax` of both sides that its API requires.
- `reference fused-linear`: `logits = hidden @ weight.T` (in the input dtype, as an lm_head
  computes them), then `reference` on those logits upcast to float32.
- `hpd_kernels fused-linear`: `fused_linear_hybrid_kl_loss` / `fused_linear_divergence_loss`.
- `liger LigerFusedLinearJSD`: Liger-Kernel's fused-linear JSD (CUDA, JSD only).

Each variant is compared with the library at the same level (logits or hidden states): its
`baseline` below.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

import hpd_kernels
from hpd_kernels import reference
from hpd_kernels.registry import DIVERGENCES, HPD, MIXTURE_PARAMETER

BENCHMARKED_OBJECTIVES = (HPD,) + DIVERGENCES   # every objective, in the reports' order (HPD first)
JSD_BETA = 0.5         # the symmetric JSD, the one Liger-Kernel benchmarks too
SKEW_ALPHA = 0.1       # DistiLLM's default skew
IGNORE_INDEX = -100
PROMPT_FRACTION = 1 / 8    # default share of prompt tokens: rows that are not in the loss, as in real SFT/KD batches
HPD_SEED = 0


def mixture_kwargs(objective: str) -> dict:
    """The objective's own parameter (JSD's beta, skew KL's alpha), identical for every variant."""
    parameter = MIXTURE_PARAMETER.get(objective)
    return {parameter: {"beta": JSD_BETA, "alpha": SKEW_ALPHA}[parameter]} if parameter else {}


@dataclass(frozen=True)
class Variant:
    name: str
    level: str                # "logits" or "hidden": what the step starts from
    baseline: Optional[str]   # the variant its ratios are taken against (None: it is the baseline)
    description: str


VARIANTS: Dict[str, Variant] = {v.name: v for v in (
    Variant("reference", "logits", "hpd_kernels",
            "reference/objectives.py on float32 logits (the recipe: full fp32 log-softmaxes; HPD samples "
            "y_hat with torch.multinomial from an fp32 softmax)"),
    Variant("reference+torch.compile", "logits", "hpd_kernels",
            "the reference wrapped in torch.compile (inductor, default mode)"),
    Variant("hpd_kernels", "logits", None, "hpd_kernels, backend='auto' (torch backend on CPU, Triton on CUDA)"),
    Variant("liger LigerJSD", "logits", "hpd_kernels",
            "Liger-Kernel LigerJSD on fp32 log_softmax of both logits (the log-probabilities its API takes)"),
    Variant("reference fused-linear", "hidden", "hpd_kernels fused-linear",
            "logits = hidden @ weight.T in the input dtype, then the reference on them in float32"),
    Variant("hpd_kernels fused-linear", "hidden", None,
            "hpd_kernels.fused_linear_* (logits one chunk of rows at a time), backend='auto'"),
    Variant("liger LigerFusedLinearJSD", "hidden", "hpd_kernels fused-linear",
            "Liger-Kernel LigerFusedLinearJSD from hidden states and weights"),
)}
COMPILED = "reference+torch.compile"
LIGER_VARIANTS = ("liger LigerJSD", "liger LigerFusedLinearJSD")


@dataclass(frozen=True)
class Shape:
    tokens: int
    vocab: int
    student_hidden: int
    teacher_hidden: int
    dtype: torch.dtype
    device: str
    prompt_fraction: float = PROMPT_FRACTION   # the first rows, outside the loss (label ignore_index)


# ----------------------------------------------------------------------------------------------
# Availability.
# ----------------------------------------------------------------------------------------------

def has_fused_linear() -> bool:
    """The fused-linear API may not exist in every checkout the suite runs against."""
    return (getattr(hpd_kernels, "fused_linear_hybrid_kl_loss", None) is not None
            and getattr(hpd_kernels, "fused_linear_divergence_loss", None) is not None)


def liger_modules():
    """(LigerJSD, LigerFusedLinearJSD) when liger_kernel imports, else None."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD, LigerJSD
    except Exception:  # not installed, or installed without a usable Triton/GPU
        return None
    return LigerJSD, LigerFusedLinearJSD


def applicable(variant: str, objective: str, device: str) -> Optional[str]:
    """None when `variant` can run `objective` here, else the reason it is left out."""
    level = VARIANTS[variant].level
    if level == "hidden" and not has_fused_linear():
        return "hpd_kernels has no fused-linear API in this checkout"
    if variant in LIGER_VARIANTS:
        if objective != "jsd":
            return "Liger-Kernel has no kernel for this objective"
        if device != "cuda":
            return "Liger-Kernel runs on GPUs only"
        if liger_modules() is None:
            return "liger_kernel is not installed"
    return None


# ----------------------------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------------------------

def _labels(tokens, vocab, device, generator, prompt_fraction):
    labels = torch.randint(0, vocab, (tokens,), generator=generator, device=device)
    labels[: int(tokens * prompt_fraction)] = IGNORE_INDEX
    return labels


def make_inputs(level: str, shape: Shape, seed: int = 0) -> dict:
    """Random problem of `shape` at `level`; the student's tensors are leaves that require grad.

    Logits: student ~ 2 N(0, 1), teacher = student + N(0, 1) (a related teacher, as in distillation),
    made in float32 and rounded to `shape.dtype`. Hidden states: N(0, 1) with weights scaled so the
    logits have about the same spread. Generated on the target device: a [16k, 152k] problem would
    take longer to draw on the host than to benchmark.
    """
    generator = torch.Generator(device=shape.device).manual_seed(seed)
    randn = lambda *size: torch.randn(*size, generator=generator, device=shape.device)
    n, v = shape.tokens, shape.vocab
    if level == "logits":
        student = randn(n, v).mul_(2.0)
        teacher = randn(n, v).add_(student)
        return {
            "student": student.to(shape.device, shape.dtype).requires_grad_(True),
            "teacher": teacher.to(shape.device, shape.dtype),
            "labels": _labels(n, v, shape.device, generator, shape.prompt_fraction),
        }
    hs, ht = shape.student_hidden, shape.teacher_hidden
    convert = lambda tensor: tensor.to(shape.dtype)
    return {
        "student_hidden": convert(randn(n, hs)).requires_grad_(True),
        "student_weight": convert(randn(v, hs).mul_(2.0 / math.sqrt(hs))).requires_grad_(True),
        "teacher_hidden": convert(randn(n, ht)),
        "teacher_weight": convert(randn(v, ht).mul_(2.0 / math.sqrt(ht))),
        "labels": _labels(n, v, shape.device, generator, shape.prompt_fraction),
    }


def leaves(inputs: dict):
    return [tensor for tensor in inputs.values() if tensor.requires_grad]


# ----------------------------------------------------------------------------------------------
# Losses.
# ----------------------------------------------------------------------------------------------

def recipe_reference_loss(objective, student_logits, teacher_logits, labels):
    """The reference the way the recipe runs it: everything in float32, y_hat from a softmax."""
    student32, teacher32 = student_logits.float(), teacher_logits.float().detach()
    if objective == "hpd":
        sampled_ids = torch.multinomial(torch.softmax(student32.detach(), dim=-1), 1)[:, 0]
        return reference.hybrid_kl_loss(student32, teacher32, labels, sampled_ids, ignore_index=IGNORE_INDEX)
    return reference.DIVERGENCE_LOSSES[objective](student32, teacher32, labels, ignore_index=IGNORE_INDEX,
                                                  **mixture_kwargs(objective))


def library_loss(objective, student_logits, teacher_logits, labels, backend="auto"):
    if objective == "hpd":
        return hpd_kernels.hybrid_kl_loss(student_logits, teacher_logits, labels, seed=HPD_SEED,
                                          ignore_index=IGNORE_INDEX, backend=backend)
    return hpd_kernels.DIVERGENCE_LOSSES[objective](student_logits, teacher_logits, labels,
                                                    ignore_index=IGNORE_INDEX, backend=backend,
                                                    **mixture_kwargs(objective))


def library_fused_linear_loss(objective, inputs, backend="auto"):
    args = (inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"],
            inputs["labels"])
    if objective == "hpd":
        return hpd_kernels.fused_linear_hybrid_kl_loss(*args, seed=HPD_SEED, ignore_index=IGNORE_INDEX,
                                                       backend=backend)
    return hpd_kernels.fused_linear_divergence_loss(*args, divergence=objective, ignore_index=IGNORE_INDEX,
                                                    backend=backend, **mixture_kwargs(objective))


def reference_fused_linear_loss(objective, inputs):
    # The lm_head in the input dtype (what a bf16 model computes), the loss on float32 logits.
    student_logits = inputs["student_hidden"] @ inputs["student_weight"].T
    with torch.no_grad():
        teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_weight"].T
    return recipe_reference_loss(objective, student_logits, teacher_logits, inputs["labels"])


def _accepts_labels(module) -> bool:
    # Older Liger releases take (log_q, log_p) / no shift_labels; newer ones take labels last.
    return "shift_labels" in inspect.signature(module.forward).parameters


def _liger_jsd_loss(inputs):
    liger_jsd, _ = liger_modules()
    loss_fn = liger_jsd(beta=JSD_BETA, ignore_index=IGNORE_INDEX)
    log_q = torch.log_softmax(inputs["student"].float(), dim=-1)
    log_p = torch.log_softmax(inputs["teacher"].float(), dim=-1)
    extra = (inputs["labels"],) if _accepts_labels(loss_fn) else ()
    return loss_fn(log_q, log_p, *extra)


def _liger_fused_linear_jsd_loss(inputs):
    _, liger_fused = liger_modules()
    loss_fn = liger_fused(jsd_beta=JSD_BETA, ignore_index=IGNORE_INDEX, temperature=1.0)
    args = [inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"]]
    if _accepts_labels(loss_fn):
        args.append(inputs["labels"])
    return loss_fn(*args)


# torch.compile'd references, one per objective and process: the compiled code is reused across
# token counts in one process (CUDA runs everything in one process).
_COMPILED_REFERENCES: Dict[str, Callable] = {}


def compiled_reference(objective):
    if objective not in _COMPILED_REFERENCES:
        # The reference's `int(active.sum())` is a graph break that dynamo explains at length on
        # every compile; it is expected here, and the benchmark's output should stay readable.
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)

        def loss_fn(student_logits, teacher_logits, labels):
            return recipe_reference_loss(objective, student_logits, teacher_logits, labels)

        _COMPILED_REFERENCES[objective] = torch.compile(loss_fn)
    return _COMPILED_REFERENCES[objective]


def _mark_token_dim_dynamic(inputs):
    """On CUDA one process measures several token counts: compile once for all of them."""
    mark = getattr(torch._dynamo, "maybe_mark_dynamic", None)
    if mark is not None:
        for tensor in (inputs["student"], inputs["teacher"], inputs["labels"]):
            mark(tensor, 0)


def loss_function(variant: str, objective: str, inputs: dict) -> Callable[[], torch.Tensor]:
    """A closure computing `variant`'s loss for `objective` on `inputs` (forward only)."""
    if variant == "reference":
        return lambda: recipe_reference_loss(objective, inputs["student"], inputs["teacher"], inputs["labels"])
    if variant == COMPILED:
        compiled = compiled_reference(objective)
        if inputs["student"].is_cuda:
            _mark_token_dim_dynamic(inputs)
        return lambda: compiled(inputs["student"], inputs["teacher"], inputs["labels"])
    if variant == "hpd_kernels":
        return lambda: library_loss(objective, inputs["student"], inputs["teacher"], inputs["labels"])
    if variant == "liger LigerJSD":
        return lambda: _liger_jsd_loss(inputs)
    if variant == "reference fused-linear":
        return lambda: reference_fused_linear_loss(objective, inputs)
    if variant == "hpd_kernels fused-linear":
        return lambda: library_fused_linear_loss(objective, inputs)
    if variant == "liger LigerFusedLinearJSD":
        return lambda: _liger_fused_linear_jsd_loss(inputs)
    raise ValueError(f"unknown variant {variant!r}; known: {list(VARIANTS)}")


def build_step(variant: str, objective: str, inputs: dict) -> Callable[[], float]:
    """Forward + backward: the loss and the gradients of every student leaf, which are then dropped.

    `torch.autograd.grad` rather than `.backward()`, so no `.grad` accumulates across repeats; the
    gradients are alive at the end of the step, so peak memory includes them for every variant.
    """
    return gradient_step(loss_function(variant, objective, inputs), leaves(inputs))


def gradient_step(compute_loss: Callable[[], torch.Tensor], student_leaves) -> Callable[[], torch.Tensor]:
    """`compute_loss()` and the gradients of `student_leaves`, alive to the step's end, then dropped."""

    def step():
        loss = compute_loss()
        grads = torch.autograd.grad(loss, student_leaves)
        del grads
        return loss.detach()

    return step
