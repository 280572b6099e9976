"""The README's Python snippets run as pasted, in order, in a fresh directory; its `ddpm-fast info`
example has the lines the command prints today."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def env():
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.pop("TRITON_INTERPRET", None)  # as a user runs them: the snippets need no Triton
    return e


@pytest.mark.slow
def test_python_snippets_run_as_pasted(tmp_path):
    snippets = blocks("python")
    assert len(snippets) >= 3
    pytest.importorskip("diffusers")
    for i, code in enumerate(snippets):
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(), capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"README python snippet {i} failed:\n{code}\n{r.stderr[-3000:]}"


def test_info_example_has_the_lines_info_prints():
    (example,) = [b for b in blocks("text") if b.startswith("$ ddpm-fast info")]
    shown = [line.split()[0] for line in example.splitlines()[1:] if line.strip()]
    r = subprocess.run([sys.executable, "-m", "ddpm_fast", "info"], env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    printed = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    assert shown == printed
