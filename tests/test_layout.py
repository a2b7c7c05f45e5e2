"""The source stays readable in pieces (issue 21): no file under `hpd_kernels/` or `reference/` over 400
lines, no Python function over 80 (Triton kernels, `@triton.jit`, excepted: a kernel is one loop the
compiler must see whole)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted(path for folder in ("hpd_kernels", "reference") for path in (ROOT / folder).rglob("*.py"))
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80


def _is_kernel(function):
    return any("jit" in ast.unparse(decorator) for decorator in function.decorator_list)


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_files_and_functions_stay_short(path):
    source = path.read_text()
    assert source.count("\n") <= MAX_FILE_LINES, f"{path.name}: {source.count(chr(10))} lines"
    long_functions = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_kernel(node)
                      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long_functions, long_functions
