"""The example notebooks: stored without outputs, with a Colab badge and an install cell, and each runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbclient  # the dev group has it: the notebooks must run, not skip
import nbformat
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "examples" / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
EXPECTED = {
    "quickstart",
    "ames_reranking",
    "mile_sets",
    "avsl_explanations",
    "mic_two_tasks",
    "distributed_evaluation",
    "from_pml",
}


def test_every_workflow_has_a_notebook() -> None:
    assert {path.stem for path in NOTEBOOKS} == EXPECTED


def test_stored_notebooks_are_what_the_build_script_writes(tmp_path: Path) -> None:
    """The notebooks' text lives in ``_build.py``: a stored notebook edited by hand, or a script change not
    rebuilt, fails here (rebuild with ``uv run python examples/notebooks/_build.py``)."""
    spec = importlib.util.spec_from_file_location("_build", NOTEBOOKS_DIR / "_build.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    written = build.write(tmp_path)
    assert sorted(path.name for path in written) == [path.name for path in NOTEBOOKS]
    for path in written:
        assert path.read_text() == (NOTEBOOKS_DIR / path.name).read_text(), path.name


@pytest.fixture(params=NOTEBOOKS, ids=lambda path: path.stem)
def notebook(request: pytest.FixtureRequest) -> tuple[Path, nbformat.NotebookNode]:
    path = request.param
    return path, nbformat.read(path, as_version=4)


def test_stored_without_outputs(notebook) -> None:
    _, nb = notebook
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_badge_and_guarded_install_cell(notebook) -> None:
    path, nb = notebook
    first, install = nb.cells[0], nb.cells[1]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    badge = f"colab.research.google.com/github/org/objretrieval/blob/main/examples/notebooks/{path.name}"
    assert "colab-badge.svg" in first.source and badge in first.source
    assert install.cell_type == "code"
    # the install only runs where objretrieval is missing
    guard = 'if importlib.util.find_spec("objretrieval") is None:\n    %pip install'
    assert guard in install.source, install.source


def test_notebook_runs(notebook, monkeypatch: pytest.MonkeyPatch) -> None:
    path, nb = notebook
    # the kernel inherits the environment: one thread, as on a busy CI machine, and no interactive backend
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the traceback, if a cell (or its final assert) fails
    # nothing was installed: pip never ran in the guarded install cell
    install_output = "".join(output.get("text", "") for output in nb.cells[1].outputs)
    assert "Requirement" not in install_output and "Collecting" not in install_output, install_output
