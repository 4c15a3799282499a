"""Run every notebook under pytest: the notebooks are the package's source *and* its lessons, so each must execute.

Cells flagged `#| slow` or `#| notest` are skipped here (see `tst_flags` in pyproject.toml); run them with
`nbdev-test --flags slow`.
"""
from pathlib import Path

import nbdev.test as nbt
import pytest

NBS = Path(__file__).resolve().parents[1] / "nbs"
NOTEBOOKS = sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith(("_", ".")))


def test_notebooks_exist():
    assert (NBS / "index.ipynb").exists(), "nbs/index.ipynb is the home page and README source"
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(nb):
    ok, secs = nbt.test_nb(nb, skip_flags=["notest", "slow"], basepath=NBS.parent)
    assert ok, f"{nb.name} failed (see the traceback above); run `nbdev-test {nb.relative_to(NBS.parent)}` to reproduce"
