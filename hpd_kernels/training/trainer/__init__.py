"""A minimal distillation trainer: a student learns from a frozen teacher with any objective.

Batches of (prompt, response) token lists are right-padded; only response tokens are in the loss.
The losses start from hidden states and the lm_head weight (fused-linear), so the step never holds
`[tokens, vocab]` logits. AdamW, linear warmup then cosine decay (or a constant rate), gradient
clipping, gradient accumulation, bf16 autocast on GPU; one JSON line of metrics per optimiser step,
periodic evaluation, and safetensors checkpoints to resume from (or another run's optimiser state
to start from: `initial_optimizer`).

Every random choice of a step (which examples, whether the batch is on-policy, the rollout, HPD's
sampling noise and the teacher's draw of sft's targets) is derived from `(seed, step)` alone, so a
run resumed from a checkpoint replays exactly the numbers of an uninterrupted one.

`options`: `TrainConfig`; `loop`: the run loop (`train`); `step`: one optimiser step and the
learning-rate schedule; `batches`: a step's micro-batches; `loss`: a micro-batch's loss and
metrics; `checkpointing`: resuming and saving a run directory; `fsdp`: the FSDP2 strategy (its
sharding and sharded checkpoints); `progress`: the progress bar.
"""

from .batches import collate  # noqa: F401
from .checkpointing import examples_sha256  # noqa: F401
from .loop import train  # noqa: F401
from .loss import batch_loss  # noqa: F401
from .options import TrainConfig  # noqa: F401
from .progress import Progress  # noqa: F401
from .step import learning_rate  # noqa: F401
