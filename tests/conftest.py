"""Test setup: the Triton kernels run through Triton's interpreter on the CPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at the top of
the first module pytest loads (scripts/test.sh sets it as well).
"""

import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# The interpreter runs kernels as NumPy, which warns on the overflows that masked-out lanes
# (-inf logits, 0 * inf) produce and the kernels then discard with tl.where.
warnings.filterwarnings("ignore", category=RuntimeWarning)

settings.register_profile(
    "ci", max_examples=int(os.environ.get("HPD_MAX_EXAMPLES", 60)), deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
