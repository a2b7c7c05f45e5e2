"""Train the teacher that `hpd experiment` distils from, by its recipe in one CPU thread, and write
it over the committed file (hpd_kernels/training/assets/addition_any_teacher.safetensors and its
.sha256). The experiment loads that file; this is how it was made.

    .venv/bin/python scripts/pin_teacher.py [PATH]
"""

import sys

from hpd_kernels.training.experiment import PINNED_TEACHER, train_pinned_teacher

if __name__ == "__main__":
    train_pinned_teacher(sys.argv[1] if len(sys.argv) > 1 else PINNED_TEACHER)
