"""README.md and docs/*.md stay true: every ```python block runs, every relative link resolves.

Each file's python blocks run as written, in order, in one namespace, in a fresh process (offline:
``HF_HUB_OFFLINE=1``, no network is reachable anyway) with a temporary working directory, so files a block
writes land there. Before the first block a prelude defines the names README's "Use it in your own loop"
block leaves to the reader (``loader``, ``epochs``, ``criterion``): three random batches of 32 px images, one
epoch, cross-entropy. Every later block of the same file sees what earlier blocks defined (``model``,
``optimizer``, ``chase``, ``slim``, ...). A block that needs a server, the network or minutes of training does
not belong in the docs as python: show it as ```bash (not run) or make it toy-size. A python block that is
illustrative only says so on the line just before it, ``<!-- not-run: the reason -->``; the reason is
required and such blocks are rare.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README] + sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES, DESIGN_WITHIN = 250, 100

PRELUDE = """
import torch
torch.manual_seed(0)
loader = [(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))) for _ in range(3)]
epochs = 1
criterion = torch.nn.CrossEntropyLoss()
"""

RUNNER = """
import json, sys, traceback
name, blocks = sys.argv[1], json.load(open(sys.argv[2], encoding="utf-8"))
namespace = {"__name__": "__docs__"}
exec(compile(sys.argv[3], "<prelude>", "exec"), namespace)
for i, (line, block) in enumerate(blocks, 1):
    try:
        exec(compile(block, f"<{name} python block {i}, line {line}>", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        sys.exit(f"{name}: python block {i} of {len(blocks)} (line {line}) failed; it starts with: "
                 f"{block.splitlines()[0]!r}")
print(f"ran {len(blocks)} blocks")
"""


class Block(NamedTuple):
    line: int              # 1-based line of the opening fence
    code: str
    not_run: Optional[str]  # the stated reason when the block is marked illustrative, else None


_FENCE = re.compile(r"^(?:<!--[ \t]*not-run:([^\n]*?)-->[ \t]*\n)?```python[ \t]*\n(.*?)^```", re.M | re.S)


def python_blocks(text: str) -> List[Block]:
    """Every ```python block of a Markdown text, with the not-run reason of the comment just before it."""
    blocks = []
    for match in _FENCE.finditer(text):
        fence = match.start() + (len(match.group(0).split("```python", 1)[0]))
        reason = None if match.group(1) is None else match.group(1).strip()
        if reason == "":
            raise ValueError(f"line {text.count(chr(10), 0, match.start()) + 1}: '<!-- not-run: -->' needs a reason")
        blocks.append(Block(text.count("\n", 0, fence) + 1, match.group(2), reason))
    return blocks


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_python_blocks_parser_honours_not_run_with_reason():
    text = ("# t\n\n```python\nx = 1\n```\n\n<!-- not-run: needs a GPU -->\n```python\nx.cuda()\n```\n"
            "<!-- not-run: for the parser only -->\n\n```python\ny = 2\n```\n")
    blocks = python_blocks(text)
    assert [(b.line, b.code, b.not_run) for b in blocks] == [
        (3, "x = 1\n", None), (8, "x.cuda()\n", "needs a GPU"), (13, "y = 2\n", None)]
    with pytest.raises(ValueError, match="line 2: .* needs a reason"):
        python_blocks("\n<!-- not-run: -->\n```python\nz = 3\n```\n")


FILES_WITH_PYTHON = [p for p in DOC_FILES if python_blocks(p.read_text(encoding="utf-8"))]


def test_readme_has_python_blocks():
    assert README in FILES_WITH_PYTHON, "README.md has no python block"


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES_WITH_PYTHON, ids=_name)
def test_python_blocks_run_in_order(path, tmp_path):
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    runnable = [(b.line, b.code) for b in blocks if b.not_run is None]
    assert len(runnable) > len(blocks) - len(runnable), f"{_name(path)}: most python blocks are marked not-run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "blocks.json").write_text(json.dumps(runnable), encoding="utf-8")
    result = subprocess.run([sys.executable, "-c", RUNNER, _name(path), "blocks.json", PRELUDE], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert f"ran {len(runnable)} blocks" in result.stdout


def _without_code(text: str) -> str:
    """The text with fenced code blocks and inline code blanked, so links shown as code are not checked."""
    text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", _without_code(path.read_text(encoding="utf-8")), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _links(path: Path) -> List[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _without_code(path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("path", DOC_FILES, ids=_name)
def test_relative_links_resolve(path):
    broken = []
    for link in _links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto:, ...: not ours to check offline
            continue
        target, _, anchor = link.partition("#")
        resolved = (path.parent / target).resolve() if target else path
        if not resolved.exists() or ROOT not in resolved.parents:
            broken.append(f"{link} (no file {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{link} (no heading #{anchor} in {_name(resolved)})")
    assert not broken, f"{_name(path)} links to what does not exist: " + "; ".join(broken)


def test_readme_fits_a_screenful_with_the_design_up_front():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it within {README_MAX_LINES}"
    headings = [i for i, line in enumerate(lines, 1) if line.startswith("## ")]
    design = next(i for i in headings if lines[i - 1].startswith("## Design"))
    end = next((i - 1 for i in headings if i > design), len(lines))
    assert end <= DESIGN_WITHIN, f"README's design section spans lines {design}-{end}; keep it in the first 100"


def test_ci_runs_readme_test_command_verbatim():
    ci_command = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                  if line.strip() and not line.startswith(("#", "set ", "cd ", "rm "))]
    assert len(ci_command) == 1, ci_command
    assert ci_command[0] in README.read_text(encoding="utf-8").splitlines(), \
        ".ci/run no longer runs README's test command verbatim: change both together"
