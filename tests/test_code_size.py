"""No function or method of the package is longer than 100 lines (its docstring aside)."""

import ast
import pathlib


PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "scoreflow_eqx"
MAX_LINES = 100


def _length(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of `fn` from its `def` to its last line, minus its docstring."""
    assert fn.end_lineno is not None
    lines = fn.end_lineno - fn.lineno + 1
    first = fn.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        assert first.end_lineno is not None
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_no_function_over_100_lines():
    lengths = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"
                lengths.append((_length(node), where))
    too_long = sorted((n, w) for n, w in lengths if n > MAX_LINES)
    assert not too_long, f"functions over {MAX_LINES} lines: {too_long}"
    assert len(lengths) > 100  # the walk did find the package's functions
