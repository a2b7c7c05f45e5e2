"""The static sm_90 report's per-objective totals (`bench/sass.py`), from the committed model: each
objective's forward + backward against its operation floor (5 `[N, V]` passes for a divergence, 4
for HPD) as well as against its kernels' own traffic."""

import json
import os

import pytest

from bench import sass

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "..", "bench", "results", "sass_sm90.json")


def test_operation_floor_per_objective():
    with open(MODEL) as handle:
        model = json.load(handle)
    totals = {(total["objective"], total["dtype"]): total for total in sass.objective_totals(model["kernels"])}
    elements = model["rows"] * model["vocab"]
    for (objective, dtype), total in totals.items():
        passes = 4 if objective.startswith("hpd") else 5
        itemsize = 2 if dtype == "bfloat16" else 4
        assert total["floor_ms"] == pytest.approx(passes * itemsize * elements / sass.BANDWIDTH * 1e3)
        assert total["floor_ratio"] == pytest.approx(total["predicted_ms"] / total["floor_ms"])
        # No kernel moves fewer bytes than the operation needs.
        assert total["memory_ms"] >= total["floor_ms"] * (1 - 1e-9)
    # One-pass forwards (forward and reverse KL, HPD with y_hat given) are at the operation's floor.
    for objective in ("forward_kl", "reverse_kl", "hpd (given)"):
        assert totals[(objective, "bfloat16")]["floor_ratio"] == pytest.approx(1.0)
    text = sass.report(model["kernels"], list(totals.values()))
    assert "predicted / floor" in text
