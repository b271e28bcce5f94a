"""The README and docs/ cannot drift from the code: every command they show
parses with its entry point's own parser (train-like commands through the
config loader too, with the config they name), every file and test they name
exists, and the commands a CPU can run do run (--help of every benchmark
shown; the quickstart in full: tests/test_quickstart.py)."""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
CONSOLE = {"cimfast-train": "train", "cimfast-finetune": "finetune", "cimfast-evaluate": "evaluate",
           "cimfast-export": "export"}
# paths a user makes or downloads: named in commands, never in the repository
USER_PATHS = re.compile(r"^(/data/|tokenizers/|outputs/|enhancer|hostfile|gpu_results)")


def _lines(page: str):
    """Each command line of the page's ```bash blocks."""
    with open(page) as f:
        text = f.read()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


COMMANDS = [(os.path.relpath(p, ROOT), line) for p in PAGES for line in _lines(p)]


def _entry(line: str):
    """(entry point, its arguments) of a command line, or (None, None)."""
    tokens = shlex.split(line)
    for i, t in enumerate(tokens):
        if t == "-m" and i + 1 < len(tokens) and tokens[i + 1].startswith("cimfast."):
            return tokens[i + 1][len("cimfast."):], tokens[i + 2:]
        if re.fullmatch(r"cimfast/\w+\.py", t):
            return t[len("cimfast/"):-3], tokens[i + 1:]
        if t in CONSOLE:
            return CONSOLE[t], tokens[i + 1:]
    return None, None


def test_the_pages_show_commands_of_every_entry_point():
    entries = {_entry(line)[0] for _, line in COMMANDS}
    assert {"train", "finetune", "evaluate", "export", "tokenizer_train"} <= entries, entries


@pytest.mark.parametrize("page,line", [c for c in COMMANDS if _entry(c[1])[0]], ids=lambda v: v[:60])
def test_every_command_parses_with_its_entry_point(page, line, monkeypatch):
    monkeypatch.chdir(ROOT)  # the pages' paths are relative to the checkout
    name, argv = _entry(line)
    if name == "train":
        from cimfast.train import parse_command
    elif name == "finetune":
        from cimfast.finetune import parse_command
    elif name == "tokenizer_train":
        from cimfast.tokenizer_train import parse_command
    elif name == "evaluate":
        from cimfast.evaluate import build_parser

        parse_command = build_parser().parse_args  # noqa: E731
    elif name == "export":
        from cimfast.export import build_parser

        parse_command = build_parser().parse_args  # noqa: E731
    elif name == "pipelines.validate":
        from cimfast.pipelines.validate import build_parser

        parse_command = build_parser().parse_args  # noqa: E731
    else:
        pytest.fail(f"{page}: {line!r} runs cimfast.{name}, which is no entry point")
    try:
        parse_command(argv)
    except SystemExit as e:
        pytest.fail(f"{page}: {line!r} does not parse (exit {e.code})")


def _named_files():
    """Every repository path (and test) the pages name, with the page naming it."""
    pattern = re.compile(r"(?<![\w/.])((?:tests|benchmarks|configs|cimfast|kernels|pipelines|scripts|docs)"
                         r"/[\w./-]*\w(?:::\w+)?)")
    for page in PAGES:
        with open(page) as f:
            for ref in pattern.findall(f.read()):
                yield os.path.relpath(page, ROOT), ref


def _missing(refs) -> list:
    """The (page, path[::test]) whose file or test function does not exist."""
    missing = []
    for page, ref in refs:
        path, _, test = ref.partition("::")
        full = os.path.join(ROOT, path)
        if "*" in path or USER_PATHS.match(path):
            continue
        if not os.path.exists(full):
            missing.append((page, ref))
        elif test and not re.search(rf"^def {test}\(", open(full).read(), re.M):
            missing.append((page, ref))
    return missing


def test_every_file_and_test_a_page_names_exists():
    refs = list(_named_files())
    assert len(refs) > 20 and _missing(refs) == []


def test_a_missing_file_or_test_is_caught():  # the check above can fail
    refs = [("p", "tests/test_nothing_here.py"), ("p", "tests/test_docs.py::test_no_such_test"),
            ("p", "tests/test_docs.py::test_a_missing_file_or_test_is_caught")]
    assert _missing(refs) == refs[:2]


BENCHMARKS = sorted({re.search(r"benchmarks/\w+\.py", line).group(0) for _, line in COMMANDS
                     if re.search(r"python benchmarks/\w+\.py", line)})


@pytest.mark.parametrize("script", BENCHMARKS)
def test_every_benchmark_shown_answers_help(script):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs them
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr[-2000:]
