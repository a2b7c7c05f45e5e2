"""`hpd experiment`'s report, rebuilt from the finished runs on disk: the table of every group of
runs (mean ± std over seeds), the pre-registered primary comparison and the paired secondary ones
(mean difference over seeds with its 95% t-interval), the learning-rate tuning and the efficiency
measures in `results.md`; the raw numbers and curves in `results.json`; the accuracy and entropy
plots.

A column of the table is one `Column` in `COLUMNS`: its label, where a run's summary holds the
value, and its format. The teacher's row reads its evaluation as `final` and its entropy on the
training batches as `curve.entropy`; the student-before row reads the warm-up evaluations as
`final`. A column that a row has no value for shows "-".

`writer`: `write_report`, the report's files; `summaries`: a finished run read back, with what is
derived from its metrics; `measures`: stability, means, paired differences and t-intervals, a
curve's area; `analysis`: the comparisons between groups; `tables`: the Markdown; `plots`: the
experiment's figures.
"""

from .analysis import analysis  # noqa: F401
from .measures import area_under_curve, paired_difference, stability, t_quantile_975  # noqa: F401
from .plots import plot_experiment  # noqa: F401
from .summaries import summary_path  # noqa: F401
from .tables import COLUMNS, Column, analysis_markdown, group_statistics, results_markdown  # noqa: F401
from .writer import write_report  # noqa: F401
