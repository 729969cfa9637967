"""notebooks/quickstart.ipynb runs top to bottom (nbclient), so it cannot rot."""

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_QUICKSTART_DIR", str(tmp_path))
    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    # Each cell gets at most 3 minutes; the whole notebook takes well under that on a 2-core CPU.
    NotebookClient(notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert any("image/png" in output.get("data", {}) for output in outputs)  # the loss / lr figure
    text = "".join(output.get("text", "") for output in outputs)
    assert "exact_match" in text and text.count("stopped at end-of-turn: True") == 2
    assert (tmp_path / "predictions.metrics.json").is_file()
