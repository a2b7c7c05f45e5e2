"""hpd-kernels: fused streaming losses for knowledge distillation of large language models.

Hybrid Policy Distillation (`hybrid_kl_loss`) and the full-vocabulary divergences, each an
autograd Function over Triton kernels (CUDA, or the CPU through `TRITON_INTERPRET=1`) with a
chunked pure-PyTorch twin for every other device. The math of record is the spec in
`docs/objectives.md`; `reference/` is its naive executable form (installed as `hpd_kernels.reference`).
"""

from .losses import (
    DIVERGENCE_LOSSES,
    HybridDetails,
    LossParts,
    divergence_loss,
    forward_kl_loss,
    generalized_jsd_loss,
    hpd_token_weights,
    hybrid_kl_loss,
    reverse_kl_loss,
    skew_forward_kl_loss,
    skew_reverse_kl_loss,
    tvd_loss,
)
from .fused_linear import (
    fused_linear_divergence_loss,
    fused_linear_forward_kl_loss,
    fused_linear_hybrid_kl_loss,
    fused_linear_jsd_loss,
    fused_linear_reverse_kl_loss,
    fused_linear_skew_forward_kl_loss,
    fused_linear_skew_reverse_kl_loss,
    fused_linear_tvd_loss,
)
from .modules import (
    ForwardKLLoss,
    GeneralizedJSDLoss,
    HybridKLLoss,
    ReverseKLLoss,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    TVDLoss,
)

__version__ = "0.1.0"

__all__ = [
    "DIVERGENCE_LOSSES", "HybridDetails", "LossParts", "divergence_loss", "forward_kl_loss", "generalized_jsd_loss", "hpd_token_weights",
    "hybrid_kl_loss", "reverse_kl_loss", "skew_forward_kl_loss", "skew_reverse_kl_loss", "tvd_loss",
    "ForwardKLLoss", "GeneralizedJSDLoss", "HybridKLLoss", "ReverseKLLoss", "SkewForwardKLLoss",
    "SkewReverseKLLoss", "TVDLoss", "fused_linear_divergence_loss", "fused_linear_forward_kl_loss",
    "fused_linear_hybrid_kl_loss", "fused_linear_jsd_loss", "fused_linear_reverse_kl_loss",
    "fused_linear_skew_forward_kl_loss", "fused_linear_skew_reverse_kl_loss", "fused_linear_tvd_loss",
]
