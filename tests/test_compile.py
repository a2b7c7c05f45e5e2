"""torch.compile(fullgraph=True) through the losses' custom ops: no graph break, the eager numbers."""

import pytest
import torch

import hpd_kernels

ROWS, VOCAB, HIDDEN = 12, 29, 8
OPTIONS = {"forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2},
           "skew_reverse_kl": {"alpha": 0.2}, "tvd": {}}


def _inputs():
    torch.manual_seed(0)
    student = torch.randn(ROWS, VOCAB, dtype=torch.float64)
    teacher = torch.randn(ROWS, VOCAB + 3, dtype=torch.float64)  # a padded teacher vocabulary
    labels = torch.randint(0, VOCAB, (ROWS,))
    labels[3] = -100
    return student, teacher, labels


def _assert_compiled_is_eager(function, *tensors):
    (eager, eager_grad), (compiled, compiled_grad) = _both(function, *tensors)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=0, atol=0)


def _both(function, *tensors):
    """`(eager, compiled)` results of `function(*tensors)`: the value and the gradient of tensors[0]."""
    results = []
    for runner in (function, torch.compile(function, fullgraph=True, backend="aot_eager")):
        leaf = tensors[0].clone().requires_grad_(True)
        value = runner(leaf, *tensors[1:])
        value.backward()
        results.append((value.detach(), leaf.grad))
    return results


@pytest.mark.parametrize("name", sorted(OPTIONS) + ["hpd"])
def test_logits_losses_compile_without_graph_breaks_and_match_eager(name):
    torch._dynamo.reset()
    student, teacher, labels = _inputs()
    if name == "hpd":
        function = lambda s, t, y: hpd_kernels.hybrid_kl_loss(s, t, y, seed=7, temperature=1.3, backend="torch")  # noqa
    else:
        function = lambda s, t, y: hpd_kernels.DIVERGENCE_LOSSES[name](s, t, y, temperature=1.3, backend="torch",  # noqa
                                                                       **OPTIONS[name])
    _assert_compiled_is_eager(function, student, teacher, labels)


def _loss_and_options(name, divergence_loss):
    """HPD's loss (at a fixed seed) for "hpd", else `divergence_loss` with its defaults."""
    return (hpd_kernels.hybrid_kl_loss, dict(seed=7)) if name == "hpd" else (divergence_loss, {})


@pytest.mark.parametrize("name", ["jsd", "hpd"])
def test_logit_maps_and_entropy_compile_too(name):
    """Soft caps, scales and the entropy output through the custom ops, the eager numbers."""
    torch._dynamo.reset()
    student, teacher, labels = _inputs()
    loss, options = _loss_and_options(name, hpd_kernels.generalized_jsd_loss)
    entropies = []

    def function(s, t, y):
        value, entropy = loss(s, t, y, backend="torch", student_softcap=2.5, student_logit_scale=0.8,
                              teacher_logit_scale=1.5, return_entropy=True, **options)
        entropies.append(entropy.detach())
        return value

    _assert_compiled_is_eager(function, student, teacher, labels)
    torch.testing.assert_close(entropies[-1], entropies[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tvd", "hpd"])
def test_the_hard_label_term_compiles_too(name):
    torch._dynamo.reset()
    student, teacher, labels = _inputs()
    loss, options = _loss_and_options(name, hpd_kernels.tvd_loss)
    function = lambda s, t, y: loss(s, t, y, ce_weight=0.4, backend="torch", **options)  # noqa: E731
    _assert_compiled_is_eager(function, student, teacher, labels)


@pytest.mark.parametrize("objective", ["hpd", "jsd"])
def test_a_compiled_training_step_with_a_fused_linear_loss_matches_eager(objective):
    """A full step (model forward, fused-linear loss over the lm_head, backward, optimiser) with the
    forward and loss compiled with fullgraph=True by Inductor."""
    torch._dynamo.reset()
    _, _, labels = _inputs()
    torch.manual_seed(1)
    features = torch.randn(ROWS, 6)
    teacher_hidden, teacher_weight = torch.randn(ROWS, 5), torch.randn(VOCAB, 5)

    def make():
        torch.manual_seed(2)
        return torch.nn.Sequential(torch.nn.Linear(6, HIDDEN), torch.nn.Tanh()), torch.nn.Linear(HIDDEN, VOCAB,
                                                                                                 bias=False)

    def loss_of(body, head):
        hidden = body(features)
        if objective == "hpd":
            return hpd_kernels.fused_linear_hybrid_kl_loss(hidden, head.weight, teacher_hidden, teacher_weight, labels,
                                                           seed=3, backend="torch", num_items_in_batch=20)
        return hpd_kernels.fused_linear_jsd_loss(hidden, head.weight, teacher_hidden, teacher_weight, labels,
                                                 beta=0.4, backend="torch", chunk_size=5)

    runs = []
    for compiled in (False, True):
        body, head = make()
        optimizer = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=0.5)
        step = torch.compile(loss_of, fullgraph=True) if compiled else loss_of
        losses = []
        for _ in range(3):
            optimizer.zero_grad()
            loss = step(body, head)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs.append((losses, [p.detach().clone() for p in (*body.parameters(), *head.parameters())]))
    (eager_losses, eager_params), (compiled_losses, compiled_params) = runs
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert eager_losses[-1] != pytest.approx(eager_losses[0], rel=1e-3)  # the steps changed the weights
    for eager, compiled in zip(eager_params, compiled_params):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_hpd_under_compile_needs_a_seed():
    torch._dynamo.reset()
    student, teacher, labels = _inputs()
    compiled = torch.compile(lambda s, t, y: hpd_kernels.hybrid_kl_loss(s, t, y, backend="torch"), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises(Exception, match="pass seed="):
        compiled(student, teacher, labels)


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schemas, fake (meta) implementations and autograd registration agree."""
    from hpd_kernels.ops import custom_ops
    from hpd_kernels.registry import LogitMaps, Objective

    student, teacher, labels = _inputs()
    student.requires_grad_(True)
    active = labels != -100
    jsd = Objective.divergence("jsd", temperature=1.3, ignore_index=-100, beta=0.3)
    hpd = Objective.hybrid(temperature=1.0, ignore_index=-100, seed=5, fkl_weight=1.0, rkl_weight=1.0)
    torch.library.opcheck(custom_ops.row_losses,
                          (student, teacher, labels, active, None, *custom_ops.objective_fields(jsd), "torch"))
    torch.library.opcheck(custom_ops.row_losses,
                          (student, teacher, labels, active, None, *custom_ops.objective_fields(hpd), "torch"))
    hidden = torch.randn(ROWS, HIDDEN, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, dtype=torch.float64, requires_grad=True)
    mapped_hpd = Objective.hybrid(temperature=1.0, ignore_index=-100, seed=3, fkl_weight=1.0, rkl_weight=1.0,
                                  ce_weight=0.5, cross_entropy=True, logit_maps=LogitMaps(0.8, 3.0, 1.2, 0.0),
                                  entropy=True)
    torch.library.opcheck(custom_ops.fused_linear, (
        hidden, weight, None, None, None, None, teacher, labels, None, active, *custom_ops.objective_fields(mapped_hpd),
        "mean", 5, "torch", True, True, False))
    mapped_jsd = Objective.divergence("jsd", temperature=0.7, ignore_index=-100, beta=0.4,
                                      logit_maps=LogitMaps(1.0, 0.0, 0.5, 2.0), entropy=True)
    torch.library.opcheck(custom_ops.row_losses,
                          (student, teacher, labels, active, None, *custom_ops.objective_fields(mapped_jsd), "torch"))
    with_hard_label = Objective.divergence("tvd", temperature=0.9, ignore_index=-100, ce_weight=0.5)
    torch.library.opcheck(custom_ops.row_losses, (student, teacher, labels, active, None,
                                                  *custom_ops.objective_fields(with_hard_label), "torch"))
