"""Run every notebook under pytest: the notebooks are the package's source *and* its lessons, so each must execute.

Cells flagged `#| slow` or `#| notest` are skipped here (see `tst_flags` in pyproject.toml); run them with
`nbdev-test --flags slow`.
"""
from pathlib import Path

import nbdev.test as nbt
import pytest

NBS = Path(__file__).resolve().parents[1] / "nbs"
# the lessons in nbs/, and the tutorials and labs in its subfolders (not nbs/_proc or checkpoints)
NOTEBOOKS = sorted(p for p in NBS.rglob("*.ipynb")
                   if not any(part.startswith(("_", ".")) for part in p.relative_to(NBS).parts))


def test_notebooks_exist():
    assert (NBS / "index.ipynb").exists(), "nbs/index.ipynb is the home page and README source"
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.relative_to(NBS).as_posix())
def test_notebook_runs(nb):
    ok, secs = nbt.test_nb(nb, skip_flags=["notest", "slow"], basepath=NBS.parent)
    assert ok, f"{nb.relative_to(NBS)} failed (see the traceback above); run `nbdev-test {nb.relative_to(NBS.parent)}` to reproduce"
