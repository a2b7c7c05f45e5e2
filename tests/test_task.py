"""The built-in addition task: worked solutions that are right, in the orders each mode promises."""

import re
from collections import Counter

import pytest

from hpd_kernels.training.task import final_answer, make_problems


def _steps(response):
    """`[(left, term, total)]` of a worked solution, and its final answer."""
    body, answer = response.rsplit("#", 1)
    return [tuple(map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", step).groups())) for step in body.split(";")], int(answer)


@pytest.mark.parametrize("orders", ["two", "any"])
def test_every_worked_solution_is_right_and_uses_each_term_once(orders):
    for prompt, response, answer in make_problems(300, seed=3, max_terms=5, orders=orders):
        terms = list(map(int, prompt.rstrip("=").split("+")))
        steps, final = _steps(response)
        used = [steps[0][0]] + [term for _, term, _ in steps]
        assert Counter(used) == Counter(terms), (prompt, response)
        running = steps[0][0]
        for left, term, total in steps:
            assert left == running and total == left + term, (prompt, response)
            running = total
        assert final == answer == sum(terms) == final_answer(response)
        if orders == "two":
            assert used in (terms, terms[::-1]), (prompt, response)


def test_any_order_is_multi_modal_at_every_step():
    """With orders='any' the term added at each step is uniform over those left: over many
    problems with distinct terms, each remaining position is chosen about equally often."""
    counts = [Counter() for _ in range(4)]  # step -> which prompt position came next
    for prompt, response, _ in make_problems(4000, seed=5, min_terms=4, max_terms=4, orders="any"):
        terms = list(map(int, prompt.rstrip("=").split("+")))
        if len(set(terms)) < 4:
            continue
        steps, _ = _steps(response)
        used = [steps[0][0]] + [term for _, term, _ in steps]
        for step, term in enumerate(used):
            counts[step][terms.index(term)] += 1
    for step in range(3):  # the last term is forced
        shares = [count / sum(counts[step].values()) for count in counts[step].values()]
        assert len(shares) == 4 and max(shares) - min(shares) < 0.06, (step, counts[step])


def test_the_two_order_task_is_unchanged():
    """orders='two' (the default of hpd distill) draws the same problems as before 'any' existed,
    so cached teachers and committed runs of it still match."""
    assert make_problems(2, seed=0) == [("14+2+9+17=", "17+9=26;26+2=28;28+14=42#42", 42),
                                        ("16+12+19+7=", "16+12=28;28+19=47;47+7=54#54", 54)]
