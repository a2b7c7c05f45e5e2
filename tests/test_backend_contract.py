"""Every backend implements the whole backend contract (`ops.backend_contract.Backend`): each entry
point, with the Protocol's own arguments (names, kinds, defaults); the vocabulary-parallel backend
refuses the one it cannot do yet by name, inside the contract."""

import inspect

import pytest
import torch

from hpd_kernels.ops import backends
from hpd_kernels.ops.backend_contract import Backend
from hpd_kernels.ops.torch_backend import TORCH
from hpd_kernels.ops.triton.backend import TRITON
from hpd_kernels.ops.vocab_parallel import HARD_LABEL_REFUSAL, VocabParallel

ENTRY_POINTS = sorted(name for name, member in vars(Backend).items()
                      if callable(member) and not name.startswith("_"))


def _vocab_parallel():
    return VocabParallel(group=None, vocab_offset=0, global_vocab=10)  # no collective runs here


def _backends():
    return {"triton": TRITON, "torch": TORCH, "vocab_parallel": _vocab_parallel()}


def _parameters(function):
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values() if p.name != "self"]


def test_the_contract_names_every_entry_point_callers_use():
    assert ENTRY_POINTS == ["divergence_backward", "divergence_forward", "hybrid_backward", "hybrid_forward",
                            "label_log_probs", "reduce_hidden_grad"]


@pytest.mark.parametrize("name", ["triton", "torch", "vocab_parallel"])
def test_each_backend_implements_the_whole_contract(name):
    backend = _backends()[name]
    assert isinstance(backend, Backend)
    assert isinstance(backend.NAME, str) and backend.NAME in backends.CHOICES
    for entry_point in ENTRY_POINTS:
        assert _parameters(getattr(backend, entry_point)) == _parameters(getattr(Backend, entry_point)), entry_point


def test_backends_are_chosen_and_named_as_the_contract_says():
    assert backends.choose("torch", torch.device("cpu")) is TORCH
    assert backends.by_name(TORCH.NAME) is TORCH and backends.by_name(TRITON.NAME) is TRITON


def test_vocab_parallel_refuses_the_hard_label_term_by_name():
    student = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="ce_weight and return_parts are not supported with process_group"):
        _vocab_parallel().label_log_probs(student, torch.zeros(2, dtype=torch.long), torch.zeros(2, 6), 1.0)
    assert "vocabulary-parallel" in HARD_LABEL_REFUSAL


def test_whole_vocabulary_backends_leave_the_hidden_gradient_alone():
    grad = torch.randn(3, 4)
    for backend in (TRITON, TORCH):
        assert backend.reduce_hidden_grad(grad) is grad


def test_both_vocabulary_strategies_implement_theirs():
    """The torch backend's passes ask the same of the whole vocabulary and of a slice."""
    from hpd_kernels.ops.torch_backend.vocabulary import WHOLE, Vocabulary
    from hpd_kernels.ops.vocab_parallel import VocabularySlice

    methods = sorted(name for name, member in vars(Vocabulary).items() if callable(member) and not name.startswith("_"))
    for vocabulary in (WHOLE, VocabularySlice(group=None, vocab_offset=0, global_vocab=10)):
        assert isinstance(vocabulary.local_rows, bool)
        for method in methods:
            assert _parameters(getattr(vocabulary, method)) == _parameters(getattr(Vocabulary, method)), method
