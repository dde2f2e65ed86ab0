"""The notebooks run top to bottom (in their quick mode: the same code on a smaller model
and fewer images) and are stored without outputs."""

from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
FIGURES = {
    "01_schedules_and_vlb.ipynb": ["betas_vs_posterior_variance.png", "vb_per_timestep.png",
                                   "alphas_cumprod_linear_vs_cosine.png"],
    "02_train_and_sample.ipynb": ["digits_samples_by_steps.png"],
}


def test_every_notebook_is_stored_without_outputs():
    assert [p.name for p in NOTEBOOKS] == sorted(FIGURES)
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name} has outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    monkeypatch.setenv("IDDPM_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("IDDPM_FIGURES", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    for name in FIGURES[path.name]:
        assert (tmp_path / name).stat().st_size > 10_000, f"{path.name} did not write {name}"
