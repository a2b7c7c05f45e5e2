"""Helpers shared by the Triton and the torch implementations."""

from __future__ import annotations

import torch


def active_rows(labels, n_rows, vocab, ignore_index, device):
    """Rows whose label is a real token of the shared vocabulary (every row when there are no labels)."""
    if labels is None:
        return torch.ones(n_rows, dtype=torch.bool, device=device)
    return (labels != ignore_index) & (labels < vocab)
