"""`hpd experiment`: every objective against HPD on the same teacher, data, optimiser and budget,
each at its own tuned learning rate, over paired seeds, with a primary metric fixed in advance.

The data regime is the recipe's (`data: "teacher"`): the pinned teacher samples one response per
training prompt (T=1, cached like a teacher: `teacher_data`), and every objective distils on
those sequences; `sft` on them is sequence-level KD (SeqKD), the baseline. SFT on the task's gold
solutions is reported as a labelled oracle (`oracle`), and HPD on the student's own rollouts
(`sweep.on_policy_fraction`, 1.0 by default) as the on-policy arm of the verl recipe.

1. **Tuning.** Each arm trains once per learning rate of `tuning.lr`, at the tuning seed, and is
   scored on a validation split (never the test problems) by the primary metric; where its best
   rate is an end of the grid, the grid grows past it (`tuning.extend` times at most); the best
   rate (the smaller one on a tie) is that arm's from then on (`lr_selection.json`).
2. **Main runs.** For each seed, the student is initialised and warmed up with `sft` on the gold
   data once (that seed's "student before"); every arm continues from that same warm student at
   its selected rate, all other options shared. The seed also fixes the batches and the sampling
   noise, so the arms are paired by seed.
3. **Report** (`report`): every arm's greedy, T=1 and top-p accuracy on the test problems, the
   pre-registered primary comparison (`primary`: the paired treatment - control difference of the
   primary metric over seeds, with its 95% t-interval), entropy, stability and efficiency.

Each run lives in `<out>/runs/<name>/` (trainer checkpoints, metrics) and is marked finished by its
`summary.json`: an interrupted experiment resumes the unfinished runs from their checkpoints and
never redoes a finished one. The report is rebuilt from the summaries at the end of every
invocation.

`settings`: the default experiment and `load_experiment`; `grid`: its arms and planned runs (the
tuning grid, the paired main runs, the learning-rate selection); `runner`: `run_experiment`, the
order of the work; `context`: what the runs of one process share; `runs`: one run, and the warm
student it starts from; `workers`: runs in parallel processes; `pinned_teacher`: how the committed
teacher was trained; `teacher_data`: the teacher's sampled distillation set.
"""

from .context import Context  # noqa: F401
from .grid import Arm, Run, arms, main_runs, run_configs, select_learning_rates, tuned, tuning_runs  # noqa: F401
from .pinned_teacher import train_pinned_teacher  # noqa: F401
from .runner import run_experiment  # noqa: F401
from .settings import (ASSETS, DEFAULT_EXPERIMENT, EXPERIMENT_BASE, EXPERIMENT_KEYS, PINNED_TEACHER,  # noqa: F401
                       TEACHER_DECODER, TEACHER_RECIPE, load_experiment, load_experiment_from_base)
