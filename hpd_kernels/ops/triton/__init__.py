"""The Triton backend: streaming kernels over the vocabulary, one kernel family per module.

- `backend`: `TritonBackend`, the entry points of `ops.backend_contract.Backend`;
- `divergence`: forward and backward of the full-vocabulary divergences;
- `hybrid`: forward (with the in-kernel Gumbel-max draw of `y_hat`) and backward of HPD;
- `gumbel`: the Triton half of the counter-based noise of `ops.gumbel`;
- `utils`: availability, launch shapes, the kernels' scalars, the online log-sum-exp and the other
  pieces both kernel families share;
- `aot`: ahead-of-time compilation of every launch for sm_90 (`python -m hpd_kernels.ops.triton.aot`).

Nothing is imported here, so that importing one module (`utils`, say) pulls in no kernels.
"""
