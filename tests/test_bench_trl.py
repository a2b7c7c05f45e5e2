"""`python -m bench.trl_compare --quick`: ours against TRL's ChunkedDivergenceFunction runs end to end on
the CPU (tiny shapes, ~20 s on 2 cores): the correctness check passes for every objective (and beta's
meaning), the measurements of one objective have results, and the outputs are written. Times mean
nothing here; one objective measured, not three, keeps it under 30 s on a busy 2-core machine."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("trl.kernels.chunked_divergence")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_checks_every_objective_and_measures_one_against_trl(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.trl_compare", "--quick", "--objectives", "jsd",
                             "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=240, cwd=REPO)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    record = json.loads((tmp_path / "trl_cpu_float32_N128_V4096.json").read_text())
    assert (tmp_path / "trl_cpu_float32_N128_V4096.md").exists()
    assert [(row["objective"], row["beta"]) for row in record["summary"]] == [("jsd", 0.5)]
    assert [measured["variant"] for measured in record["results"]] == [
        "trl ChunkedDivergenceFunction", "hpd_kernels fused-linear"]
    for row in record["summary"]:
        for key in ("memory_ratio", "cold_ratio", "warm_ratio"):
            assert row[key] > 0, (row, key)
        assert row["loss_relative_difference"] < 1e-4, row
    assert {"forward_kl", "jsd", "reverse_kl", "jsd beta=0 vs forward_kl",
            "jsd beta=1 vs reverse_kl"} <= set(record["correctness"])
    assert all("error" not in measured for measured in record["results"]), record["results"]
