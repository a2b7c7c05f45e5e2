"""The README's API examples run as written, in order, in one namespace."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["loss"].requires_grad and namespace["student_logits"].grad is not None
    assert 0.0 <= namespace["details"].mismatch_rate.item() <= 1.0
    assert namespace["student_head"].weight.grad is not None and namespace["teacher_head"].weight.grad is None
