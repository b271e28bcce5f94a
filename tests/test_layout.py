"""The limits that keep the code walkable, checked by reading it (AST), so they
cannot quietly regrow: the training loop's size and depth, module sizes, and
the commands at the top that nothing imports."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "cimfast")
COMMANDS = {"train", "finetune", "tokenizer_train", "evaluate", "export"}
BLOCKS = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.AsyncFor, ast.AsyncWith, ast.Match)


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, ROOT), path


def _depth(node, level=0) -> int:
    """The deepest nesting of blocks (if, for, while, with, try) under ``node``."""
    deepest = level
    for child in ast.iter_child_nodes(node):
        deepest = max(deepest, _depth(child, level + isinstance(child, BLOCKS)))
    return deepest


def test_run_job_reads_top_down_in_at_most_60_lines_and_3_levels():
    with open(os.path.join(PACKAGE, "engine", "loop.py")) as f:
        tree = ast.parse(f.read())
    run_job = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run_job")
    assert run_job.end_lineno - run_job.lineno + 1 <= 60
    assert _depth(run_job) <= 3


def test_depth_counts_nested_blocks():  # the measure above can fail
    src = ("def f():\n    try:\n        while x:\n            if y:\n                for z in w:\n                    pass\n"
           "    finally:\n        pass\n")
    assert _depth(ast.parse(src).body[0]) == 4


def test_no_module_over_400_lines():
    sizes = {rel: sum(1 for _ in open(path)) for rel, path in _modules()}
    assert sizes and {rel: n for rel, n in sizes.items() if n > 400} == {}


def test_no_cimfast_module_imports_a_command():
    offenders = []
    for rel, path in _modules():
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n in {f"cimfast.{c}" for c in COMMANDS} for n in names):
                offenders.append((rel, node.lineno))
    assert offenders == []
