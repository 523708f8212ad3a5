"""Every ```python block of README.md runs as written, in order, in one namespace.

The blocks run in a fresh process (offline: ``HF_HUB_OFFLINE=1``, no network is reachable anyway) with a
temporary working directory, so files a block writes land there. Before the first block a prelude defines
the names the "Use it in your own loop" block leaves to the reader (``loader``, ``epochs``, ``criterion``):
three random batches of 32 px images, one epoch, cross-entropy. Every later block sees what earlier blocks
defined (``model``, ``optimizer``, ``chase``, ``slim``, ...). A block that needs a server or the network does
not belong in README as python: show it as ```bash or as text instead.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

PRELUDE = """
import torch
torch.manual_seed(0)
loader = [(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))) for _ in range(3)]
epochs = 1
criterion = torch.nn.CrossEntropyLoss()
"""

RUNNER = """
import json, sys, traceback
blocks = json.load(open(sys.argv[1], encoding="utf-8"))
namespace = {"__name__": "__readme__"}
exec(compile(sys.argv[2], "<prelude>", "exec"), namespace)
for i, block in enumerate(blocks, 1):
    try:
        exec(compile(block, f"<README.md python block {i}>", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        sys.exit(f"README.md python block {i} of {len(blocks)} failed; it starts with: {block.splitlines()[0]!r}")
print(f"ran {len(blocks)} blocks")
"""


def python_blocks(text: str) -> list:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


@pytest.mark.slow
def test_readme_python_blocks_run_in_order(tmp_path):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no python block"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(README.parent), os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "blocks.json").write_text(json.dumps(blocks), encoding="utf-8")
    result = subprocess.run([sys.executable, "-c", RUNNER, "blocks.json", PRELUDE], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert f"ran {len(blocks)} blocks" in result.stdout

