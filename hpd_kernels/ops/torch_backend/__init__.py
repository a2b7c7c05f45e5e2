"""The torch backend: the same math as the Triton kernels (`ops/triton/`), in plain PyTorch, for any
device; the same entry points and outputs (`ops.backend_contract.Backend`), so the autograd
Functions do not care which runs. One file per job:

- `backend`: `TorchBackend` (`TORCH`, over the whole vocabulary), the contract's entry points;
- `divergence`: the full-vocabulary divergences, forward and backward;
- `hybrid`: HPD, forward and backward;
- `sampling`: HPD's Gumbel-max draw, the Triton kernel's bit for bit;
- `vocabulary`: the row reductions over a row's vocabulary (whole here, a slice under vocabulary
  parallelism: `ops.vocab_parallel`);
- `row_math`: the log-sum-exps, log-softmaxes and gradient pieces both objectives share;
- `row_spans`: which rows a pass computes (runs outside the loss left out), in which chunks;
- `compile_policy`: when the chunk math runs through `torch.compile`.
"""

from .backend import TORCH, TorchBackend  # noqa: F401
from .compile_policy import COMPILE_ENV, eager_elements, eager_phase_over  # noqa: F401  (benchmarks read them)
from .sampling import gumbel_scores  # noqa: F401
