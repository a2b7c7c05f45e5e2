"""HPD's block draw (`ops/gumbel.py`, issue 23 item 2): the drawn token depends on neither the Triton
kernel's tile width nor chunking (rows drawn in any split, with their batch indices as keys), and
both backends draw the very same tokens on the CPU; ragged vocabularies (a partial last block), a
larger teacher vocabulary (cropped), masked columns and whole masked blocks, masked rows, a NaN
logit, logit maps. The distribution itself is `test_sampling.py`'s (chi-square)."""

import math

import pytest
import torch

pytest.importorskip("triton")

from hpd_kernels.ops import gumbel  # noqa: E402
from hpd_kernels.ops.torch_backend import TORCH  # noqa: E402
from hpd_kernels.ops.torch_backend.sampling import block_log2_masses, padded_blocks  # noqa: E402
from hpd_kernels.ops.triton import utils as triton_utils  # noqa: E402
from hpd_kernels.registry import IDENTITY_MAPS, LogitMaps  # noqa: E402

if not triton_utils.interpreter_enabled():
    pytest.skip("runs the kernels under TRITON_INTERPRET=1", allow_module_level=True)

from hpd_kernels.ops.triton.backend import TRITON  # noqa: E402

ROWS = 23


def _problem(dtype, vocab, teacher_vocab):
    generator = torch.Generator().manual_seed(vocab)
    student = (torch.randn(ROWS, vocab, generator=generator, dtype=torch.float64) * 2).to(dtype)
    teacher = (torch.randn(ROWS, teacher_vocab, generator=generator, dtype=torch.float64) * 2).to(dtype)
    student[1, 5] = student[2, :40] = float("-inf")   # a masked column; whole masked blocks
    student[4] = float("-inf")                        # a row without a distribution
    student[6, 17] += 12.0                             # a peaked row: later tiles are skipped
    student[3, 50] = float("nan")                      # a NaN logit: its block and column rank first
    labels = torch.randint(0, vocab, (ROWS,), generator=generator)
    labels[0] = labels[9] = -100
    return student, teacher, labels


def _draw(backend, student, teacher, labels, rows=None, maps=IDENTITY_MAPS, seed=5):
    rows = torch.arange(ROWS) if rows is None else rows
    return backend.hybrid_forward(student[rows], teacher[rows], labels[rows], None, seed=seed, temperature=0.7,
                                  fkl_weight=1.0, rkl_weight=1.0, ignore_index=-100, row_ids=rows,
                                  logit_maps=maps).sampled_ids


@pytest.mark.parametrize("maps", (IDENTITY_MAPS, LogitMaps(0.7, 3.0, 1.0, 0.0)), ids=("identity", "student-cap"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("vocab", (300, 77), ids=("v300", "v77"))
def test_the_draw_ignores_tile_width_and_chunks_and_backend(vocab, dtype, maps, monkeypatch):
    student, teacher, labels = _problem(dtype, vocab, vocab + 10)
    expected = _draw(TORCH, student, teacher, labels, maps=maps)
    assert (expected[labels != -100] >= 0).all() and (expected[labels != -100] < vocab).all()
    assert expected[0] == -100 and expected[9] == -100
    assert not torch.isin(expected[1], torch.tensor([5])) and expected[2] >= 40  # never a masked column
    assert expected[3] == 50
    chunks = [torch.arange(0, 7), torch.arange(7, 8), torch.arange(8, ROWS)]
    shuffled = torch.randperm(ROWS, generator=torch.Generator().manual_seed(1))
    for block_v in (16, 64, 4096):
        monkeypatch.setattr(triton_utils, "MAX_BLOCK_V", block_v)
        assert torch.equal(_draw(TRITON, student, teacher, labels, maps=maps), expected), block_v
        chunked = torch.cat([_draw(TRITON, student, teacher, labels, rows, maps) for rows in chunks])
        assert torch.equal(chunked, expected), block_v
        assert torch.equal(_draw(TRITON, student, teacher, labels, shuffled, maps), expected[shuffled]), block_v
    torch_chunked = torch.cat([_draw(TORCH, student, teacher, labels, rows, maps) for rows in chunks])
    assert torch.equal(torch_chunked, expected)


def test_peaked_rows_skip_tiles_and_draw_the_same(monkeypatch):
    """Every row peaked early: the kernel skips the later tiles' masses (their bound
    cannot beat the best block) and still draws what the torch backend draws; a `+inf` logit wins."""
    student, teacher, labels = _problem(torch.float32, 300, 300)
    student[torch.arange(ROWS), 48 + torch.arange(ROWS) % 16] += 60.0  # in the fourth 16-wide tile
    student[7, 250] = math.inf
    expected = _draw(TORCH, student, teacher, labels)
    assert expected[7] == 250
    for block_v in (16, 4096):
        monkeypatch.setattr(triton_utils, "MAX_BLOCK_V", block_v)
        assert torch.equal(_draw(TRITON, student, teacher, labels), expected), block_v


def test_seeds_give_independent_draws():
    """Another seed, or the same seed with another row index, draws independently (the block and
    column streams are keyed by both)."""
    student, teacher, labels = _problem(torch.float32, 300, 300)
    student = torch.zeros_like(student)  # uniform rows: 300 equally likely tokens
    first, second = _draw(TORCH, student, teacher, labels, seed=1), _draw(TORCH, student, teacher, labels, seed=2)
    active = labels != -100
    assert (first[active] != second[active]).float().mean() > 0.8
    assert len(set(first[active].tolist())) > 15  # rows draw unlike one another


def test_block_masses_are_the_blocks_log2_sum_exp():
    """`m_b = log2 sum_{v in b} 2^(s_v c)`, -inf for a masked block, the last block cut short."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 40, generator=generator, dtype=torch.float64) * 5
    logits[1, 16:32] = -math.inf
    logits[2, 3] = math.inf
    scale = torch.tensor(1.7, dtype=torch.float64)
    masses = block_log2_masses(padded_blocks(logits), scale)
    assert masses.shape == (4, 3)
    padded = torch.nn.functional.pad(logits, (0, 8), value=-math.inf).view(4, 3, gumbel.DRAW_BLOCK)
    expected = torch.logsumexp(padded * scale * math.log(2.0), dim=-1) / math.log(2.0)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(masses[finite], expected[finite], rtol=1e-13, atol=1e-12)
    assert masses[1, 1] == -math.inf and masses[2, 0] == math.inf


def test_block_and_column_noise_are_separate_streams():
    keys = gumbel.row_keys_torch(gumbel.seed_key(5), torch.arange(8))
    block_keys = gumbel.row_keys_torch(gumbel.block_seed_key(gumbel.seed_key(5)), torch.arange(8))
    columns = torch.arange(64)
    column_noise, block_noise = gumbel.gumbel2_torch(keys, columns), gumbel.gumbel2_torch(block_keys, columns)
    assert not torch.isin(block_noise, column_noise).any()
    per_row = gumbel.gumbel2_at_torch(keys, columns.expand(8, -1).contiguous())
    assert torch.equal(per_row, column_noise)
