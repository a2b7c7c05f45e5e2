"""The Triton backend: streaming kernels over the vocabulary, one kernel family per module.

- `backend`: the backend object, with the four entry points of its peer `ops.torch_backend`;
- `divergence`: forward and backward of the full-vocabulary divergences;
- `hybrid`: forward (with the in-kernel Gumbel-max draw of `y_hat`) and backward of HPD;
- `utils`: availability, launch shapes, the online log-sum-exp and the other pieces both share;
- `aot`: ahead-of-time compilation of every launch for sm_90 (`python -m hpd_kernels.ops.triton.aot`).

Nothing is imported here, so that `ops.gumbel` can take its Triton half from `utils` without
pulling in the kernels that use it.
"""
