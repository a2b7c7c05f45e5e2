"""pytest plumbing for `bench/test_micro.py`: a closing table of ratios, reference / hpd_kernels.

pytest-benchmark's own tables show each group's rows relative to the fastest; this adds the one
number the comparison is about, per group, from the medians measured in this same run.
"""

import pytest

from bench.workloads import VARIANTS

_MEDIANS = pytest.StashKey[dict]()


@pytest.fixture
def record_median(request):
    medians = request.config.stash.setdefault(_MEDIANS, {})

    def record(group, variant, benchmark):
        stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
        if stats:
            medians[(group, variant)] = stats["median"]

    return record


def pytest_terminal_summary(terminalreporter, config):
    medians = config.stash.get(_MEDIANS, {})
    rows = []
    for (group, variant), median in sorted(medians.items()):
        baseline = VARIANTS[variant].baseline
        if baseline and (group, baseline) in medians:
            rows.append(f"{group:<44} {variant:<24} {median / medians[(group, baseline)]:6.2f}x  "
                        f"(vs {baseline})")
    if rows:
        terminalreporter.section("median time ratio, variant / hpd_kernels (same run)")
        for row in rows:
            terminalreporter.write_line(row)
