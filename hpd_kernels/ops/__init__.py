"""Below the entry layer: the backend contract (`backend_contract`) and its three implementations,
the two peer backends (`triton/`, `torch_backend/`) and the vocabulary-parallel one
(`vocab_parallel`), chosen once per call (`backends`); the autograd Functions that take any of them
(`row_losses`, `chunked_linear`), their `torch.library` forms (`custom_ops`), and what the backends
share (`common`, `gumbel`)."""
