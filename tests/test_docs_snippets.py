"""Every ```python block in README.md and docs/*.md runs, as written, in a fresh interpreter.

Each block is one test, named file:line. It runs as a script in an empty temp folder with
HF_HUB_OFFLINE=1, so it sees only what a user who copied it would have. Every block spawns a
process and some load an embedded model, so all are marked slow. A block that is deliberately not
runnable carries the line `# doc: no-run` (keep that rare).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NO_RUN = "# doc: no-run"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)


def snippets() -> list[tuple[str, str]]:
    """(page:line, code) of every python block, the line being the block's opening fence."""
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            out.append((f"{page.relative_to(ROOT)}:{line}", match.group(1)))
    return out


def _param(where: str, code: str) -> pytest.param:
    marks = [pytest.mark.slow]
    if NO_RUN in code:
        marks.append(pytest.mark.skip(reason=f"{where} is marked '{NO_RUN}'"))
    return pytest.param(code, id=where, marks=marks)


CASES = [_param(where, code) for where, code in snippets()]


def test_the_pages_have_snippets() -> None:
    assert len(CASES) >= 5
    assert not [c for c in CASES if NO_RUN in c.values[0]][2:], "more than 2 no-run blocks: make them runnable"


@pytest.mark.parametrize("code", CASES)
def test_snippet_runs_in_a_fresh_interpreter(code: str, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=280)
    assert done.returncode == 0, f"snippet failed:\n{code}\n--- stderr ---\n{done.stderr[-3000:]}"
