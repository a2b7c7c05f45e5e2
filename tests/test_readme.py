"""The README's API examples run as written, in order, in one namespace.

A block whose first line starts with `# Not run by tests/test_readme.py` (one that downloads
models) is only shown; the test it names runs the same code on tiny models.
"""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
NOT_RUN = "# Not run by tests/test_readme.py"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace = {}
    for block in blocks:
        if block.startswith(NOT_RUN):
            continue
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["loss"].requires_grad and namespace["student_logits"].grad is not None
    assert 0.0 <= namespace["details"].mismatch_rate.item() <= 1.0
    assert namespace["student_head"].weight.grad is not None and namespace["teacher_head"].weight.grad is None
    # The trainer integrations' examples.
    assert namespace["trainer"].state.global_step == 2
    assert namespace["gkd_value"].ndim == 0 and namespace["gkd_value"].item() > 0
