"""Vocabulary-parallel losses and the global-token mean, on 2 CPU processes with the gloo backend.

Each worker holds an uneven slice of the vocabulary (20 + 17 of 37 columns) and must reproduce, for
every objective, the unsharded loss, its gradient on its own slice, and HPD's sampled tokens.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hpd_kernels
from hpd_kernels import registry

WORLD, VOCAB, SPLIT, ROWS = 2, 37, 20, 13
MASKED = [5, 9]
MIXTURE_VALUES = {"beta": 0.3, "alpha": 0.2}
DIVERGENCE_OPTIONS = {name: {parameter: MIXTURE_VALUES[parameter]} if parameter else {}
                      for name in registry.DIVERGENCES for parameter in [registry.MIXTURE_PARAMETER.get(name)]}


def _finish():
    """Both ranks leave together: a rank that tears gloo down while its peer still talks to it can
    abort the peer's process."""
    dist.barrier()
    dist.destroy_process_group()


def _init(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)  # identical full tensors on every rank; each keeps its slice


def _slice(rank):
    return slice(0, SPLIT) if rank == 0 else slice(SPLIT, VOCAB)


def _inputs():
    student = torch.randn(ROWS, VOCAB, dtype=torch.float64) * 2
    teacher = torch.randn(ROWS, VOCAB, dtype=torch.float64) * 2
    teacher[0, 3] = student[1, 30] = float("-inf")   # absent tokens on either side, in both slices
    student[MASKED[0]] = teacher[MASKED[1]] = float("-inf")  # rows without a distribution (tests/test_masked_rows.py)
    labels = torch.randint(0, VOCAB, (ROWS,))
    labels[2] = labels[7] = -100
    labels[4] = 25  # a label owned by rank 1
    return student, teacher, labels


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _logits_worker(rank, init_file):
    _init(rank, init_file)
    student, teacher, labels = _inputs()
    part = _slice(rank)
    for temperature in (1.0, 1.7):
        for name, options in DIVERGENCE_OPTIONS.items():
            for reduction in ("mean", "none"):
                full = student.clone().requires_grad_(True)
                expected = hpd_kernels.DIVERGENCE_LOSSES[name](full, teacher, labels, temperature=temperature,
                                                               reduction=reduction, backend="torch", **options)
                expected.sum().backward()
                local = student[:, part].clone().requires_grad_(True)
                loss = hpd_kernels.DIVERGENCE_LOSSES[name](local, teacher[:, part], labels, temperature=temperature,
                                                           reduction=reduction, process_group=dist.group.WORLD,
                                                           **options)
                loss.sum().backward()
                _close(loss, expected.detach(), f"{name} T={temperature} {reduction} loss")
                _close(local.grad, full.grad[:, part], f"{name} T={temperature} {reduction} grad")
                assert (local.grad[MASKED] == 0).all() and (reduction != "none" or (loss[MASKED] == 0).all())
        for seed in (0, 11):
            full = student.clone().requires_grad_(True)
            expected, expected_details = hpd_kernels.hybrid_kl_loss(
                full, teacher, labels, seed=seed, temperature=temperature, fkl_weight=0.7, backend="torch",
                return_details=True)
            expected.backward()
            local = student[:, part].clone().requires_grad_(True)
            loss, details = hpd_kernels.hybrid_kl_loss(
                local, teacher[:, part], labels, seed=seed, temperature=temperature, fkl_weight=0.7,
                process_group=dist.group.WORLD, return_details=True)
            loss.backward()
            assert torch.equal(details.sampled_ids, expected_details.sampled_ids), "HPD draws another token"
            assert bool((details.sampled_ids >= SPLIT).any() and (details.sampled_ids[labels != -100] < SPLIT).any())
            _close(loss, expected.detach(), f"hpd T={temperature} loss")
            _close(local.grad, full.grad[:, part], f"hpd T={temperature} grad")
            assert torch.isfinite(loss) and (local.grad[MASKED] == 0).all()
            _close(details.label_weight, expected_details.label_weight, "hpd w_y")
    _finish()


def _fused_worker(rank, init_file):
    _init(rank, init_file)
    _, _, labels = _inputs()
    hidden = torch.randn(ROWS, 8, dtype=torch.float64)
    weight = torch.randn(VOCAB, 8, dtype=torch.float64)
    teacher_hidden, teacher_weight = torch.randn(ROWS, 6, dtype=torch.float64), torch.randn(VOCAB, 6, dtype=torch.float64)
    part = _slice(rank)
    for objective in ("hpd", "jsd", "reverse_kl"):
        results = []
        for sliced in (False, True):
            h = hidden.clone().requires_grad_(True)
            w = (weight[part] if sliced else weight).clone().requires_grad_(True)
            kwargs = dict(chunk_size=5, backend="torch")
            if sliced:
                kwargs.update(process_group=dist.group.WORLD)
            t_w = teacher_weight[part] if sliced else teacher_weight
            if objective == "hpd":
                loss = hpd_kernels.fused_linear_hybrid_kl_loss(h, w, teacher_hidden, t_w, labels, seed=5, **kwargs)
            else:
                loss = hpd_kernels.fused_linear_divergence_loss(h, w, teacher_hidden, t_w, labels,
                                                                divergence=objective, **kwargs)
            loss.backward()
            results.append((loss.detach(), h.grad, w.grad if sliced else w.grad[part]))
        for what, unsharded, sharded in zip(("loss", "grad hidden", "grad weight"), *results):
            _close(sharded, unsharded, f"fused-linear {objective} {what}")
    _finish()


def _global_mean_worker(rank, init_file):
    """Uneven active tokens per rank: sum over ranks of (local sum / global count) is the global mean."""
    _init(rank, init_file)
    student, teacher, labels = _inputs()
    rows = slice(0, 4) if rank == 0 else slice(4, ROWS)   # 4 rows (one ignored) against 9 (one ignored)
    global_count = int((labels != -100).sum())
    full = student.clone().requires_grad_(True)
    expected = hpd_kernels.hybrid_kl_loss(full, teacher, labels, seed=3, backend="torch")
    expected.backward()
    mine = student[rows].clone().requires_grad_(True)
    local_count = torch.tensor(int((labels[rows] != -100).sum()))
    total = local_count.clone()
    dist.all_reduce(total)
    assert int(total) == global_count and int(local_count) != global_count // 2
    # The rows keep their global index (row_ids is not a public argument): draw with given ids.
    sampled = hpd_kernels.hpd_token_weights(student, teacher, labels, seed=3, backend="torch").sampled_ids
    loss = hpd_kernels.hybrid_kl_loss(mine, teacher[rows], labels[rows], sampled_ids=sampled[rows],
                                      num_items_in_batch=total, backend="torch")
    loss.backward()
    summed = loss.detach().clone()
    dist.all_reduce(summed)
    _close(summed, expected.detach(), "global-token mean")
    _close(mine.grad, full.grad[rows], "global-token mean grad")
    # The per-rank mean would be wrong: the check above has power.
    per_rank = hpd_kernels.hybrid_kl_loss(student[rows], teacher[rows], labels[rows], sampled_ids=sampled[rows],
                                          backend="torch").detach()
    dist.all_reduce(per_rank)
    assert abs(float(per_rank) / WORLD - float(expected)) > 1e-3
    _finish()


def _refused_on_every_rank(call, match):
    """`call` raises ValueError matching `match` on this rank; every rank runs this together, so a
    rank that waited in a collective instead would hang the test rather than pass it."""
    with pytest.raises(ValueError, match=match):
        call()


def _layout_worker(rank, init_file):
    """Each bad layout, wrong on one rank only, is refused on both ranks with the same message (a
    check on the bad rank alone would leave the other waiting in its first collective); explicit
    offsets are honoured, slices in either rank order."""
    _init(rank, init_file)
    student, teacher, labels = _inputs()
    group = dist.group.WORLD
    part = _slice(rank)
    mine, theirs = student[:, part], teacher[:, part]
    empty = slice(0, 0) if rank == 1 else slice(0, VOCAB)
    _refused_on_every_rank(lambda: hpd_kernels.forward_kl_loss(student[:, empty], teacher[:, empty], labels,
                                                                process_group=group), "rank 1 holds an empty slice")
    _refused_on_every_rank(lambda: hpd_kernels.hybrid_kl_loss(student[:, empty], teacher[:, empty], labels, seed=1,
                                                               process_group=group), "rank 1 holds an empty slice")
    hidden, weight = torch.randn(ROWS, 8, dtype=torch.float64), torch.randn(VOCAB, 8, dtype=torch.float64)
    _refused_on_every_rank(lambda: hpd_kernels.fused_linear_forward_kl_loss(
        hidden, weight[empty], teacher_logits=teacher[:, empty], labels=labels, process_group=group),
        "rank 1 holds an empty slice")
    narrower = teacher[:, part][:, :-1] if rank == 0 else theirs
    _refused_on_every_rank(lambda: hpd_kernels.reverse_kl_loss(mine, narrower, labels, process_group=group),
                           "rank 0's student_logits and teacher_logits must hold the same slice")
    _refused_on_every_rank(lambda: hpd_kernels.reverse_kl_loss(mine, theirs, labels, process_group=group,
                                                               vocab_offset=0 if rank == 0 else None),
                           r"vocab_offset is given on ranks \[0\] only")
    _refused_on_every_rank(lambda: hpd_kernels.reverse_kl_loss(mine, theirs, labels, process_group=group,
                                                               vocab_offset=0 if rank == 0 else SPLIT - 1),
                           f"rank 1's starts at {SPLIT - 1} where {SPLIT} was expected")
    _refused_on_every_rank(lambda: hpd_kernels.reverse_kl_loss(mine, theirs, labels, process_group=group,
                                                               vocab_offset=0 if rank == 0 else -3),
                           "rank 1's vocab_offset must be an integer")
    # Rank 0 holds the upper columns, rank 1 the lower: the offsets say so, and the loss is the unsharded one.
    upper = slice(VOCAB - SPLIT, VOCAB) if rank == 0 else slice(0, VOCAB - SPLIT)
    expected = hpd_kernels.hybrid_kl_loss(student, teacher, labels, seed=4, backend="torch")
    got = hpd_kernels.hybrid_kl_loss(student[:, upper], teacher[:, upper], labels, seed=4, process_group=group,
                                     vocab_offset=upper.start)
    _close(got, expected, "offsets in reverse rank order")
    contiguous = hpd_kernels.hybrid_kl_loss(student[:, upper], teacher[:, upper], labels, seed=4, process_group=group)
    assert abs(float(contiguous) - float(expected)) > 1e-6  # without the offsets the columns are misplaced
    _finish()


def test_layout_problem_names_what_is_wrong():
    from hpd_kernels.ops.vocab_parallel import DEFAULT_OFFSET, INVALID_OFFSET, layout_problem

    assert layout_problem([(20, 20, DEFAULT_OFFSET), (17, 17, DEFAULT_OFFSET)]) is None
    assert layout_problem([(20, 20, 17), (17, 17, 0)]) is None
    assert "rank 2 holds an empty slice" in layout_problem([(3, 3, -1), (4, 4, -1), (0, 0, -1)])
    assert "must hold the same slice, got widths 4 and 5" in layout_problem([(3, 3, -1), (4, 5, -1)])
    assert "rank 0's vocab_offset" in layout_problem([(3, 3, INVALID_OFFSET), (4, 4, 3)])
    assert "rank 1's starts at 4 where 3" in layout_problem([(3, 3, 0), (4, 4, 4)])      # a gap
    assert "rank 0's starts at 1 where 0" in layout_problem([(3, 3, 1), (4, 4, 4)])      # not from 0
    assert "rank 1's starts at 2 where 3" in layout_problem([(3, 3, 0), (4, 4, 2)])      # an overlap
    assert "rank 1's starts at 0 where 3" in layout_problem([(3, 3, 0), (3, 3, 0)])      # the same columns twice


@pytest.mark.parametrize("worker", [_logits_worker, _fused_worker, _global_mean_worker, _layout_worker])
def test_two_gloo_processes(worker, tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)


THREE_SLICES = [(0, 5), (5, 12), (12, 37)]  # the draw's block 0 (columns 0-15) spans all three slices


def _three_slices_worker(rank, init_file):
    """HPD's block draw (`ops/gumbel.py`, P = 16) over slices that cut a block in three and another
    in two draws every token the unsharded backend draws, in float32 and float64, under a soft cap."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3)
    torch.manual_seed(0)
    begin, end = THREE_SLICES[rank]
    student, teacher, labels = _inputs()
    student[3, :12] += 4.0  # rows whose mass sits in the three-way block
    drawn = []
    for dtype, seed, cap in ((torch.float64, 1, None), (torch.float32, 2, None), (torch.float64, 3, 3.0)):
        options = dict(seed=seed, temperature=0.8, return_details=True, student_softcap=cap, teacher_softcap=cap)
        s, t = student.to(dtype), teacher.to(dtype)
        expected = hpd_kernels.hybrid_kl_loss(s, t, labels, backend="torch", **options)[1].sampled_ids
        got = hpd_kernels.hybrid_kl_loss(s[:, begin:end].contiguous(), t[:, begin:end].contiguous(), labels,
                                         process_group=dist.group.WORLD, **options)[1].sampled_ids
        assert torch.equal(got, expected), (dtype, seed, got, expected)
        drawn.append(got[labels != -100])
    drawn = torch.cat(drawn)
    assert all(((drawn >= low) & (drawn < high)).any() for low, high in THREE_SLICES), drawn  # not vacuous
    _finish()


def test_three_gloo_processes_split_a_draw_block(tmp_path):
    mp.spawn(_three_slices_worker, args=(str(tmp_path / "init"),), nprocs=3, join=True)


def test_vocab_parallel_arguments_are_checked():
    student = torch.randn(3, 5)
    with pytest.raises(ValueError, match="vocab_offset is only meaningful with process_group"):
        hpd_kernels.forward_kl_loss(student, student, vocab_offset=4)
    with pytest.raises(ValueError, match="num_items_in_batch divides the summed loss, so it needs reduction='mean'"):
        hpd_kernels.forward_kl_loss(student, student, reduction="sum", num_items_in_batch=4)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        hpd_kernels.forward_kl_loss(student, student, process_group=object())


def test_num_items_in_batch_divides_the_sum_in_functions_and_criteria():
    student, teacher, labels = _inputs()
    total = hpd_kernels.hybrid_kl_loss(student, teacher, labels, seed=2, reduction="sum", backend="torch")
    for value in (hpd_kernels.hybrid_kl_loss(student, teacher, labels, seed=2, num_items_in_batch=40, backend="torch"),
                  hpd_kernels.HybridKLLoss(backend="torch")(student, teacher, labels, seed=2, num_items_in_batch=40)):
        torch.testing.assert_close(value, total / 40)
    jsd_sum = hpd_kernels.generalized_jsd_loss(student, teacher, labels, reduction="sum")
    torch.testing.assert_close(hpd_kernels.GeneralizedJSDLoss()(student, teacher, labels, num_items_in_batch=7),
                               jsd_sum / 7)
