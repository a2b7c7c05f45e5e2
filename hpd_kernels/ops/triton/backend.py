"""The Triton backend's entry points, the same four as its peer `ops.torch_backend`, so a backend is
chosen once per call (`ops.backends.choose`) and the autograd Functions take either."""

from .divergence import divergence_backward, divergence_forward  # noqa: F401
from .hybrid import hybrid_backward, hybrid_forward  # noqa: F401

NAME = "triton"
