"""Naive pure-PyTorch implementations of every objective: the executable spec the kernels are tested against.

It lives in `reference/` at the top of the checkout and is installed as `hpd_kernels.reference`
(`from hpd_kernels import reference`), under no top-level name of its own."""

from .objectives import (  # noqa: F401
    DIVERGENCE_LOSSES,
    LOSS_NAMES,
    divergence_weights,
    forward_kl_loss,
    generalized_jsd_loss,
    hpd_weights,
    hybrid_kl_loss,
    mapped_logits,
    reverse_kl_loss,
    sample_student,
    sft_loss,
    skew_forward_kl_loss,
    skew_reverse_kl_loss,
    student_entropy,
    token_weights,
    tvd_loss,
    weighted_log_likelihood,
)
