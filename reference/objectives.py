"""The distillation objectives of `docs/objectives.md`, written to be read, not to be fast.

Every function materialises full `[N, V]` log-softmaxes in the dtype it is given (call it with
float64 tensors to get the numbers the kernels are tested against). Nothing here is clever:
each objective is its formula from the spec, one line per term.

Conventions (all from the spec):
- logits are `[..., V_s]` / `[..., V_t]`, labels `[...]`; leading dimensions are flattened to rows;
- both vocabularies are cropped to `V = min(V_s, V_t)`; a label `>= V` counts as ignored;
- `q = softmax(s / T)` is the student, `p = softmax(t / T)` the teacher; no `T^2` factor;
- `0 * log 0 = 0`: a `-inf` logit contributes nothing.
"""

from __future__ import annotations

import math

import torch

# Installed as `hpd_kernels.reference` (the package-dir mapping of pyproject.toml): `..registry` is
# hpd_kernels.registry, and this folder has no top-level name of its own.
from ..registry import DIVERGENCES, HPD, SFT

# The name of every loss defined here: `sft_loss`, the divergences (`DIVERGENCE_LOSSES`), `hybrid_kl_loss`.
LOSS_NAMES = (SFT,) + DIVERGENCES + (HPD,)


# ----------------------------------------------------------------------------------------------
# Shared plumbing: cropping, log-softmax, masks, reductions.
# ----------------------------------------------------------------------------------------------

def _rows(student_logits, teacher_logits, labels, ignore_index):
    """Flatten to rows, crop both vocabularies to V = min(V_s, V_t), and mark the active rows."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    student = student_logits.reshape(-1, student_logits.shape[-1])[:, :vocab]
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])[:, :vocab].detach()
    if labels is None:
        active = torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
        labels = torch.full_like(active, ignore_index, dtype=torch.long)
    else:
        labels = labels.reshape(-1).long()
        active = (labels != ignore_index) & (labels < vocab)
    return student, teacher, labels, active


def mapped_logits(logits, *, scale=1.0, softcap=None):
    """A model's logit post-processing, before the temperature: `softcap * tanh(scale * z / softcap)`
    (Gemma's final soft-capping after a Cohere-style `logit_scale`), or `scale * z` without a cap.
    A `-inf` logit stays `-inf`: a masked column stays masked. Call a loss on the mapped logits;
    autograd carries the gradient through the `tanh`."""
    scaled = scale * logits
    if softcap is None:
        return scaled
    return torch.where(logits == -math.inf, logits.detach(), softcap * torch.tanh(scaled / softcap))


def student_entropy(student_logits, teacher_logits, *, temperature=1.0):
    """`-sum_v q log q` per row (nats) of the student's `q = softmax(s / T)` over the shared vocabulary."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_q = torch.log_softmax(student_logits[..., :vocab] / temperature, dim=-1)
    q = log_q.exp()
    return -(q * _unless_absent(q, log_q)).sum(-1)


def _log_softmaxes(student, teacher, temperature):
    return torch.log_softmax(student / temperature, dim=-1), torch.log_softmax(teacher / temperature, dim=-1)


def _unless_absent(prob, value):
    """`value` where `prob` is not 0, else 0: the spec's `0 * log 0 = 0` (a NaN `prob` stays NaN).

    Apply it to the log-ratio *before* multiplying by the probability, so that autograd never
    meets `0 * (-inf - -inf)` in the backward pass either.
    """
    return torch.where(prob == 0, torch.zeros_like(value), value)


def _log_mix(log_a, weight_a, log_b, weight_b):
    """`log(weight_a * exp(log_a) + weight_b * exp(log_b))`, in log space (never underflows).

    Where both inputs are -inf the result is -inf; those entries are routed around logsumexp,
    whose backward would otherwise compute exp(-inf - -inf) = NaN.
    """
    terms = []
    if weight_a > 0:
        terms.append(log_a + math.log(weight_a))
    if weight_b > 0:
        terms.append(log_b + math.log(weight_b))
    stacked = torch.stack(terms)
    absent = (stacked == -math.inf).all(dim=0)
    mixed = torch.logsumexp(torch.where(absent, torch.zeros_like(stacked), stacked), dim=0)
    return torch.where(absent, torch.full_like(mixed, -math.inf), mixed)


def _reduce(per_row, active, reduction):
    per_row = torch.where(active, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / max(int(active.sum()), 1)


# ----------------------------------------------------------------------------------------------
# Values per row. Each takes the cropped log-softmaxes `log_q`, `log_p` of shape [N, V].
# ----------------------------------------------------------------------------------------------

def _kl(log_a, log_b):
    """KL(a || b) per row: sum_v a (log a - log b)."""
    a = log_a.exp()
    return (a * _unless_absent(a, log_a - log_b)).sum(-1)


def forward_kl_per_row(log_q, log_p):
    return _kl(log_p, log_q)


def reverse_kl_per_row(log_q, log_p):
    return _kl(log_q, log_p)


def jsd_per_row(log_q, log_p, beta):
    if beta == 0.0:
        return forward_kl_per_row(log_q, log_p)
    if beta == 1.0:
        return reverse_kl_per_row(log_q, log_p)
    log_m = _log_mix(log_p, beta, log_q, 1.0 - beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def skew_forward_kl_per_row(log_q, log_p, alpha):
    log_m = _log_mix(log_p, alpha, log_q, 1.0 - alpha)
    return _kl(log_p, log_m)


def skew_reverse_kl_per_row(log_q, log_p, alpha):
    log_m = _log_mix(log_q, alpha, log_p, 1.0 - alpha)
    return _kl(log_q, log_m)


def tvd_per_row(log_q, log_p):
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


# ----------------------------------------------------------------------------------------------
# The unified view: token weights w(v), detached, with dL/ds = -(w - q * sum w) / (T * N_active).
# ----------------------------------------------------------------------------------------------

def divergence_weights(log_q, log_p, objective, *, beta=0.5, alpha=0.1):
    """The spec's table of `w(v)`, shape [N, V], for a full-vocabulary objective."""
    log_q, log_p = log_q.detach(), log_p.detach()
    q, p = log_q.exp(), log_p.exp()
    if objective == "jsd" and beta == 0.0:
        objective = "forward_kl"
    if objective == "jsd" and beta == 1.0:
        objective = "reverse_kl"
    if objective == "forward_kl":
        return p
    if objective == "reverse_kl":
        return q * _unless_absent(q, log_p - log_q)
    if objective == "jsd":
        log_m = _log_mix(log_p, beta, log_q, 1.0 - beta)
        return (1.0 - beta) * q * _unless_absent(q, log_m - log_q)
    if objective == "skew_forward_kl":
        log_m = _log_mix(log_p, alpha, log_q, 1.0 - alpha)
        absent = (log_p == -math.inf) | (log_q == -math.inf)
        return torch.where(absent, torch.zeros_like(log_m), (1.0 - alpha) * (log_p + log_q - log_m).exp())
    if objective == "skew_reverse_kl":
        log_m = _log_mix(log_q, alpha, log_p, 1.0 - alpha)
        return q * _unless_absent(q, log_m - log_q + alpha * (log_q - log_m).exp())
    if objective == "tvd":
        return 0.5 * q * torch.sign(p - q)
    raise ValueError(f"no weights for objective {objective!r}")


def hpd_weights(log_q, log_p, labels, sampled_ids, *, fkl_weight=1.0, rkl_weight=1.0):
    """HPD's two weights per row, exactly as the spec writes them.

    Returns `(w_y, w_hat)`, each [N]; rows whose label or sample is out of range get weight 0 and
    must be masked by the caller.
    """
    vocab = log_q.shape[-1]
    safe_y = labels.clamp(0, vocab - 1)
    safe_hat = sampled_ids.clamp(0, vocab - 1)
    log_q, log_p = log_q.detach(), log_p.detach()
    log_q_y, log_p_y = log_q.gather(1, safe_y[:, None])[:, 0], log_p.gather(1, safe_y[:, None])[:, 0]
    log_q_hat, log_p_hat = log_q.gather(1, safe_hat[:, None])[:, 0], log_p.gather(1, safe_hat[:, None])[:, 0]
    q_y, q_hat = log_q_y.exp(), log_q_hat.exp()

    d_y = q_y * _unless_absent(q_y, log_p_y - log_q_y)          # reverse-KL weight at y
    d_hat = q_hat * _unless_absent(q_hat, log_p_hat - log_q_hat)  # reverse-KL weight at y-hat
    under = (d_y > 0).to(log_q.dtype)   # p(y) > q(y): the student under-estimates the data token
    over = (d_hat < 0).to(log_q.dtype)  # q(y_hat) > p(y_hat): it over-estimates its own sample
    differs = (safe_hat != safe_y).to(log_q.dtype)

    w_y = rkl_weight * d_y + fkl_weight * log_p_y.exp() * under * (1.0 + over)
    w_hat = rkl_weight * d_hat * over * differs
    return w_y, w_hat


def token_weights(student_logits, teacher_logits, labels=None, *, objective, temperature=1.0,
                  ignore_index=-100, beta=0.5, alpha=0.1, sampled_ids=None, fkl_weight=1.0,
                  rkl_weight=1.0):
    """The spec's weights `w(v)` as a dense [N, V] tensor (V cropped), zero on inactive rows.

    For HPD the two per-row weights are scattered onto columns `y` and `y_hat` (they add when
    `y_hat == y`, where `w_hat` is 0 anyway); for SFT the weight is the one-hot label.
    """
    student, teacher, labels, active = _rows(student_logits, teacher_logits, labels, ignore_index)
    log_q, log_p = _log_softmaxes(student.detach(), teacher, temperature)
    vocab = log_q.shape[-1]
    if objective == "sft":
        weights = torch.zeros_like(log_q)
        weights[torch.arange(len(labels)), labels.clamp(0, vocab - 1)] = 1.0
    elif objective == "hpd":
        w_y, w_hat = hpd_weights(log_q, log_p, labels, sampled_ids.reshape(-1).long(),
                                 fkl_weight=fkl_weight, rkl_weight=rkl_weight)
        weights = torch.zeros_like(log_q)
        rows = torch.arange(len(labels))
        weights[rows, labels.clamp(0, vocab - 1)] += w_y
        weights[rows, sampled_ids.reshape(-1).long().clamp(0, vocab - 1)] += w_hat
    else:
        weights = divergence_weights(log_q, log_p, objective, beta=beta, alpha=alpha)
    return torch.where(active[:, None], weights, torch.zeros_like(weights))


def weighted_log_likelihood(student_logits, weights, labels=None, *, temperature=1.0,
                            ignore_index=-100, reduction="mean"):
    """`L_w = -sum_v w(v) log q(v)` per row, reduced: the surrogate whose gradient every objective shares."""
    vocab = weights.shape[-1]
    student = student_logits.reshape(-1, student_logits.shape[-1])[:, :vocab]
    log_q = torch.log_softmax(student / temperature, dim=-1)
    per_row = -_unless_absent(weights.abs(), weights * log_q).sum(-1)
    if labels is None:
        active = torch.ones(per_row.shape[0], dtype=torch.bool, device=per_row.device)
    else:
        labels = labels.reshape(-1)
        active = (labels != ignore_index) & (labels < vocab)
    return _reduce(per_row, active, reduction)


# ----------------------------------------------------------------------------------------------
# The losses, as a user would call them.
# ----------------------------------------------------------------------------------------------

def _divergence(per_row_fn, student_logits, teacher_logits, labels, temperature, ignore_index,
                reduction, **kwargs):
    student, teacher, _, active = _rows(student_logits, teacher_logits, labels, ignore_index)
    log_q, log_p = _log_softmaxes(student, teacher, temperature)
    out = _reduce(per_row_fn(log_q, log_p, **kwargs), active, reduction)
    return out.reshape(student_logits.shape[:-1]) if reduction == "none" else out


def forward_kl_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, ignore_index=-100, reduction="mean"):
    return _divergence(forward_kl_per_row, student_logits, teacher_logits, labels, temperature, ignore_index, reduction)


def reverse_kl_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, ignore_index=-100, reduction="mean"):
    return _divergence(reverse_kl_per_row, student_logits, teacher_logits, labels, temperature, ignore_index, reduction)


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, *, beta=0.5, temperature=1.0, ignore_index=-100, reduction="mean"):
    return _divergence(jsd_per_row, student_logits, teacher_logits, labels, temperature, ignore_index, reduction, beta=beta)


def skew_forward_kl_loss(student_logits, teacher_logits, labels=None, *, alpha=0.1, temperature=1.0, ignore_index=-100, reduction="mean"):
    return _divergence(skew_forward_kl_per_row, student_logits, teacher_logits, labels, temperature, ignore_index, reduction, alpha=alpha)


def skew_reverse_kl_loss(student_logits, teacher_logits, labels=None, *, alpha=0.1, temperature=1.0, ignore_index=-100, reduction="mean"):
    return _divergence(skew_reverse_kl_per_row, student_logits, teacher_logits, labels, temperature, ignore_index, reduction, alpha=alpha)


def tvd_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, ignore_index=-100, reduction="mean"):
    return _divergence(tvd_per_row, student_logits, teacher_logits, labels, temperature, ignore_index, reduction)


def sft_loss(student_logits, labels, *, temperature=1.0, ignore_index=-100, reduction="mean"):
    """Cross-entropy on the label: `-log q(y)`."""
    student = student_logits.reshape(-1, student_logits.shape[-1])
    labels = labels.reshape(-1).long()
    active = (labels != ignore_index) & (labels < student.shape[-1])
    log_q = torch.log_softmax(student / temperature, dim=-1)
    per_row = -log_q.gather(1, labels.clamp(0, student.shape[-1] - 1)[:, None])[:, 0]
    out = _reduce(per_row, active, reduction)
    return out.reshape(student_logits.shape[:-1]) if reduction == "none" else out


def hybrid_kl_loss(student_logits, teacher_logits, labels, sampled_ids, *, fkl_weight=1.0, rkl_weight=1.0,
                   temperature=1.0, ignore_index=-100, reduction="mean"):
    """HPD: `-(w_y log q(y) + w_hat log q(y_hat))` per row with detached weights.

    The reference takes `sampled_ids` (y_hat) from the caller; `sample_student` draws them.
    """
    student, teacher, labels, active = _rows(student_logits, teacher_logits, labels, ignore_index)
    log_q, log_p = _log_softmaxes(student, teacher, temperature)
    sampled_ids = sampled_ids.reshape(-1).long()
    w_y, w_hat = hpd_weights(log_q, log_p, labels, sampled_ids, fkl_weight=fkl_weight, rkl_weight=rkl_weight)
    vocab = log_q.shape[-1]
    log_q_y = log_q.gather(1, labels.clamp(0, vocab - 1)[:, None])[:, 0]
    log_q_hat = log_q.gather(1, sampled_ids.clamp(0, vocab - 1)[:, None])[:, 0]
    per_row = -(_unless_absent(w_y.abs(), w_y * log_q_y) + _unless_absent(w_hat.abs(), w_hat * log_q_hat))
    out = _reduce(per_row, active, reduction)
    return out.reshape(student_logits.shape[:-1]) if reduction == "none" else out


# The divergences by their registry names, as `hpd_kernels.DIVERGENCE_LOSSES` has them: each function under
# its own name, in the registry's order (checked, never assumed).
DIVERGENCE_LOSSES = {"forward_kl": forward_kl_loss, "reverse_kl": reverse_kl_loss, "jsd": generalized_jsd_loss,
                     "skew_forward_kl": skew_forward_kl_loss, "skew_reverse_kl": skew_reverse_kl_loss,
                     "tvd": tvd_loss}
if tuple(DIVERGENCE_LOSSES) != DIVERGENCES:
    raise ImportError(f"DIVERGENCE_LOSSES names {tuple(DIVERGENCE_LOSSES)}, registry.DIVERGENCES {DIVERGENCES}")


def sample_student(student_logits, *, temperature=1.0, generator=None):
    """Draw y_hat ~ softmax(s / T) per row, with an explicit softmax (the recipe's way)."""
    probs = torch.softmax(student_logits.reshape(-1, student_logits.shape[-1]).double() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].reshape(student_logits.shape[:-1])
