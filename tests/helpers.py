"""Random distillation problems for the property tests, and the tolerances they are checked with.

Logit *values* come from a torch generator seeded by hypothesis, not from hypothesis' own float
strategies: those shrink towards small integers, which make exact mathematical ties (p(v) == q(v),
log p(y) == log q(y)) where TVD's sign and HPD's branches are discontinuous, and where a one-ulp
difference in summation order between two correct implementations flips the answer. Shapes,
vocabularies, masks, temperatures, ignored rows and tile widths are drawn by hypothesis and shrink.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from hypothesis import strategies as st

import hpd_kernels
from hpd_kernels import reference
from hpd_kernels.registry import DIVERGENCES, OBJECTIVES  # noqa: F401  (the tests' lists)

IGNORE = -100

# Which one-sided -inf masks keep each objective finite. A teacher -inf where the student has mass
# makes KL(q || p) infinite, a student -inf where the teacher has mass makes KL(p || q) infinite;
# HPD needs finite log-probabilities at y and y_hat, which a shared mask guarantees.
MASK_MODES = {
    "forward_kl": ("none", "shared", "teacher"),
    "reverse_kl": ("none", "shared", "student"),
    "jsd": ("none", "shared", "teacher", "student"),
    "skew_forward_kl": ("none", "shared", "teacher", "student"),
    "skew_reverse_kl": ("none", "shared", "teacher", "student"),
    "tvd": ("none", "shared", "teacher", "student"),
    "hpd": ("none", "shared"),
}

REFERENCE_LOSSES = reference.DIVERGENCE_LOSSES


@dataclass
class Case:
    objective: str
    student: torch.Tensor          # [*leading, V_s], possibly a row-strided view, in `dtype`
    teacher: torch.Tensor          # [*leading, V_t]
    labels: Optional[torch.Tensor]
    sampled_ids: Optional[torch.Tensor]
    temperature: float
    reduction: str
    mix: float                     # beta for JSD, alpha for skew KL
    dtype: torch.dtype

    @property
    def vocab(self):
        return min(self.student.shape[-1], self.teacher.shape[-1])

    def kwargs(self):
        kwargs = dict(temperature=self.temperature, ignore_index=IGNORE, reduction=self.reduction)
        if self.objective == "jsd":
            kwargs["beta"] = self.mix
        if self.objective.startswith("skew"):
            kwargs["alpha"] = self.mix
        if self.objective == "hpd":
            kwargs["sampled_ids"] = self.sampled_ids
        return kwargs

    def max_scaled_logit(self):
        finite = lambda x: x[torch.isfinite(x)].abs().max().item() if torch.isfinite(x).any() else 0.0
        return max(finite(self.student.double()), finite(self.teacher.double())) / self.temperature


def library_loss(case, student, backend):
    kwargs = dict(case.kwargs(), backend=backend)
    if case.objective == "hpd":
        return hpd_kernels.hybrid_kl_loss(student, case.teacher, case.labels, **kwargs)
    return hpd_kernels.DIVERGENCE_LOSSES[case.objective](student, case.teacher, case.labels, **kwargs)


def reference_loss(case, student):
    """The reference on the very same (dtype-rounded) values, in float64."""
    teacher = case.teacher.double()
    kwargs = case.kwargs()
    if case.objective == "hpd":
        kwargs.pop("sampled_ids")
        return reference.hybrid_kl_loss(student, teacher, case.labels, case.sampled_ids, **kwargs)
    return REFERENCE_LOSSES[case.objective](student, teacher, case.labels, **kwargs)


def reference_weights(case):
    kwargs = dict(objective=case.objective, temperature=case.temperature, ignore_index=IGNORE)
    if case.objective == "jsd":
        kwargs["beta"] = case.mix
    if case.objective.startswith("skew"):
        kwargs["alpha"] = case.mix
    if case.objective == "hpd":
        kwargs["sampled_ids"] = case.sampled_ids
    return reference.token_weights(case.student.double(), case.teacher.double(), case.labels, **kwargs)


def _apply_mask(logits, mask):
    return logits.masked_fill(mask, -math.inf)


@st.composite
def cases(draw, objective, dtype, *, reductions=("mean", "sum", "none"), max_rows=40, max_vocab=700):
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):
        leading = (draw(st.integers(0, max_rows)),)
    else:
        leading = (draw(st.integers(1, 4)), draw(st.integers(1, max_rows // 4)))
    n_rows = math.prod(leading)
    vocab_s = draw(st.integers(1, max_vocab))
    vocab_t = draw(st.one_of(st.just(vocab_s), st.integers(1, max_vocab)))
    vocab = min(vocab_s, vocab_t)
    temperature = draw(st.sampled_from([0.5, 0.75, 1.0, 2.0, 3.0]))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0, 10.0]))
    # Teacher = related student (as in distillation) or independent.
    student = torch.randn(n_rows, vocab_s, generator=gen, dtype=torch.float64) * scale
    teacher = torch.randn(n_rows, vocab_t, generator=gen, dtype=torch.float64) * scale
    if draw(st.booleans()):
        shared = min(vocab_s, vocab_t)
        teacher[:, :shared] = student[:, :shared] + 0.5 * scale * torch.randn(n_rows, shared, generator=gen, dtype=torch.float64)

    # Labels: mostly real tokens, some ignored, some >= V (ignored by the spec's cropping).
    labels = torch.randint(0, vocab, (n_rows,), generator=gen)
    low_precision = dtype != torch.float64
    use_labels = objective == "hpd" or low_precision or draw(st.booleans())
    if use_labels:
        kinds = torch.rand(n_rows, generator=gen)
        ignore_fraction = draw(st.sampled_from([0.0, 0.25, 1.0]))
        labels[kinds < ignore_fraction] = IGNORE
        if draw(st.booleans()):
            wide = max(vocab_s, vocab_t) + 3
            out_of_vocab = (kinds >= ignore_fraction) & (kinds < ignore_fraction + 0.15)
            labels[out_of_vocab] = torch.randint(vocab, wide, (int(out_of_vocab.sum()),), generator=gen)

    # -inf logits: columns with probability 0 (never the label column, never column 0 of the shared
    # vocabulary, so that every row keeps a finite log-sum-exp).
    mix = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0] if objective == "jsd" else [0.0, 0.1, 0.5, 0.9]))
    # At its endpoints a mixture divergence is plain forward / reverse KL, with their masks.
    endpoint = {("jsd", 0.0): "forward_kl", ("jsd", 1.0): "reverse_kl", ("skew_forward_kl", 0.0): "forward_kl",
                ("skew_reverse_kl", 0.0): "reverse_kl"}.get((objective, mix), objective)
    mask_mode = draw(st.sampled_from(MASK_MODES[endpoint]))
    if mask_mode != "none":
        width = max(vocab_s, vocab_t)
        mask = torch.rand(n_rows, width, generator=gen) < 0.2
        mask[:, 0] = False
        real = (labels >= 0) & (labels < vocab)
        mask[real.nonzero()[:, 0], labels[real]] = False
        if mask_mode in ("shared", "student"):
            student = _apply_mask(student, mask[:, :vocab_s])
        if mask_mode in ("shared", "teacher"):
            teacher = _apply_mask(teacher, mask[:, :vocab_t])

    # Round to the tested dtype; the reference sees the rounded values, so only the kernels'
    # arithmetic is under test, not the input rounding.
    student, teacher = student.to(dtype), teacher.to(dtype)

    sampled_ids = None
    if objective == "hpd":
        q = torch.softmax(student.double()[:, :vocab] / temperature, dim=-1)
        sampled_ids = torch.multinomial(q, 1, generator=gen)[:, 0] if n_rows else torch.zeros(0, dtype=torch.long)

    if low_precision and n_rows:
        labels = _drop_ambiguous_rows(objective, student, teacher, labels, sampled_ids, temperature)

    # Non-contiguous rows: the logits are the first columns of a wider buffer.
    padding = draw(st.sampled_from([0, 0, 5]))
    if padding:
        student = _row_strided(student, padding)
        teacher = _row_strided(teacher, padding)

    reduction = draw(st.sampled_from(reductions))
    return Case(
        objective=objective,
        student=student.reshape(*leading, vocab_s),
        teacher=teacher.reshape(*leading, vocab_t),
        labels=labels.reshape(leading) if use_labels else None,
        sampled_ids=None if sampled_ids is None else sampled_ids.reshape(leading),
        temperature=temperature, reduction=reduction, mix=mix, dtype=dtype,
    )


def _row_strided(logits, padding):
    wide = torch.full((logits.shape[0], logits.shape[1] + padding), 7.0, dtype=logits.dtype)
    wide[:, : logits.shape[1]] = logits
    return wide[:, : logits.shape[1]]


def _drop_ambiguous_rows(objective, student, teacher, labels, sampled_ids, temperature, margin=1e-3):
    """Ignore rows whose answer hinges on a near-tie that fp32 arithmetic cannot resolve.

    TVD's weight has sign(p - q) per token and HPD branches on log p(y) > log q(y) and
    log p(y_hat) < log q(y_hat). Within ~1e-6 of a tie, float32 may land on either side, and
    both sides are correct answers to a problem that differs only by rounding.
    """
    vocab = min(student.shape[1], teacher.shape[1])
    log_q = torch.log_softmax(student.double()[:, :vocab] / temperature, dim=-1)
    log_p = torch.log_softmax(teacher.double()[:, :vocab] / temperature, dim=-1)
    gap = (log_p - log_q).abs().nan_to_num(nan=math.inf)
    if objective == "tvd":
        ambiguous = (gap < margin).any(dim=1)
    elif objective == "hpd":
        safe = labels.clamp(0, vocab - 1)
        ambiguous = (gap.gather(1, safe[:, None])[:, 0] < margin) | (gap.gather(1, sampled_ids[:, None])[:, 0] < margin)
    else:
        return labels
    return torch.where(ambiguous, torch.full_like(labels, IGNORE), labels)


# ----------------------------------------------------------------------------------------------
# Tolerances.
# ----------------------------------------------------------------------------------------------

def loss_tolerance(case):
    """(rtol, atol) for a per-row loss.

    float64: both sides compute in float64; the only differences are summation order and the
    online rescaling, a few ulps of the largest scaled logit M: 1e-12 * (1 + M) is ~100x that.
    float32 / bfloat16 inputs: the kernels accumulate in float32 (eps 6e-8). A log-probability
    `x / T - lse` carries an absolute error of a few eps * M; every loss is a probability-weighted
    sum of such terms, so 2e-6 * (1 + M) gives ~10x headroom at M up to ~100.
    """
    scale = 1.0 + case.max_scaled_logit()
    if case.dtype == torch.float64:
        return 1e-10, 1e-12 * scale
    return 1e-5, 2e-6 * scale


def grad_tolerance(case):
    """(rtol, atol) for a gradient, elementwise `|g - g_ref| <= atol + rtol * |g_ref|`.

    Each gradient element is `-(row_scale / T) * (w(j) - q(j) * W)`, a difference of two terms
    that can cancel (forward KL's is q - p), so its rounding error scales with the terms, not the
    result: `G = max_rows (row_scale / T) * (1 + max_j |w(j)| + |W|)` (row_scale <= 1 / N_active for
    "mean", <= 1 otherwise), with the weights from the reference. The 1 covers `W` itself when it is
    computed as a difference of log-sum-exps (reverse KL's `W = -KL`), whose error is absolute.
    float64: 1e-12 * (1 + M) * G, ~100x the few ulps two correct float64 implementations differ by.
    float32: 2e-6 * (1 + M) * G, the float32 log-probability error as for the loss.
    bfloat16 / float16: the gradient is *stored* in the logits' dtype. A GPU rounds to nearest (half
    an ulp, 2^-8 relative for bfloat16), but Triton's interpreter truncates, which costs up to one
    ulp: rtol 2^-7 (float16: 2^-10) of the element, on top of the float32 error.
    """
    weights = reference_weights(case)
    if weights.numel() == 0:
        return 0.0, 0.0
    row_terms = 1.0 + weights.abs().amax(dim=1) + weights.sum(dim=1).abs()
    n_rows = case.student.shape[:-1].numel()
    n_active = n_rows if case.labels is None else int(((case.labels >= 0) & (case.labels < case.vocab)).sum())
    row_scale = 1.0 / max(n_active, 1) if case.reduction == "mean" else 1.0
    terms = row_scale / case.temperature * row_terms.max().item()
    scale = 1.0 + case.max_scaled_logit()
    if case.dtype == torch.float64:
        return 0.0, 1e-12 * scale * terms + 1e-300
    storage = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[case.dtype]
    return storage, 2e-6 * scale * terms + 1e-300
