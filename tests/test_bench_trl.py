"""`python -m bench.trl_compare --quick`: ours against TRL's ChunkedDivergenceFunction runs end to end on
the CPU (tiny shapes, ~20 s on 2 cores): the correctness check passes, every measurement has a result,
and the outputs are written. Times mean nothing here."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("trl.kernels.chunked_divergence")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_compares_every_objective_with_trl(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.trl_compare", "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=240, cwd=REPO)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    record = json.loads((tmp_path / "trl_cpu_float32_N128_V4096.json").read_text())
    assert (tmp_path / "trl_cpu_float32_N128_V4096.md").exists()
    assert [row["objective"] for row in record["summary"]] == ["forward_kl", "jsd", "reverse_kl"]
    assert [row["beta"] for row in record["summary"]] == [0.0, 0.5, 1.0]
    for row in record["summary"]:
        for key in ("memory_ratio", "cold_ratio", "warm_ratio"):
            assert row[key] > 0, (row, key)
        assert row["loss_relative_difference"] < 1e-4, row
    assert {"jsd beta=0 vs forward_kl", "jsd beta=1 vs reverse_kl"} <= set(record["correctness"])
    assert all("error" not in measured for measured in record["results"]), record["results"]
