"""The README's complete library example runs as written."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_the_two_commands():
    lines = README.read_text().splitlines()
    block = lines[lines.index("```sh") + 1 : lines.index("```sh") + 3]
    assert block[0].startswith("make run") and block[1].startswith("make test")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci


def test_complete_example_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(b for b in blocks if "hg.meta_gradient(" in b)
    proc = subprocess.run(
        [sys.executable, "-c", example],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=README.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shape, val_loss, residual = proc.stdout.split()[-3:]
    assert float(val_loss) > 0 and float(residual) < 1e-3
