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

Logit maps (`registry.LogitMaps`) are applied as each chunk is read (`row_math.scale_chunk`,
`scaled_rows`, `gathered_logits`; the compiled chunk functions take them as arguments); the identity
maps skip them entirely. The backward multiplies by the student map's slope after the top column
(`registry.STAT_TOP_S`) is taken from the others (`row_math.write_gradient`, `top_from_others`).
The student's entropy comes from the forward's own chunks (`row_math.entropy_sums`).
"""

from .backend import TORCH, TorchBackend  # noqa: F401
from .compile_policy import COMPILE_ENV, eager_elements, eager_phase_over  # noqa: F401  (benchmarks read them)
from .sampling import gumbel_scores  # noqa: F401
