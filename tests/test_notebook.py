"""notebooks/walkthrough.ipynb: stored without outputs, and run top to bottom on 3 real patients in a fresh
kernel of this very Python (the venv's, with its brainmets), as a reader would run it."""

from __future__ import annotations

import json
import os
import re
import socket
import sys

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "walkthrough.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs before committing"


@pytest.mark.slow
def test_walkthrough_runs_top_to_bottom(real_data, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(new_code_cell("import sys; print(sys.executable)"))
    # The kernel is a new process: it gets this branch's sources and the data through its environment. The
    # inline backend draws the figures into the notebook; a backend from the caller's environment would not.
    paths = [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "BRAINMETS_DATA": str(real_data)}
    env.pop("MPLBACKEND", None)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert nb.cells[-1].outputs[-1]["text"].strip() == sys.executable  # the venv's Python ran it
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    assert figures == 8  # slices, CLAHE, augmentation, loss curve, Dice per patient, one slice, a stack, the API
    tables = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(tables) == 2 and all(t.startswith("| ") for t in tables)

    work = tmp_path / "walkthrough-files"
    log = (work / "run" / "log.jsonl").read_text().splitlines()
    assert log and json.loads(log[-1])["epoch"] == len(log)
    report = json.loads((work / "report.json").read_text())
    assert report["patients"] == 3 and len(report["per_patient"]) == 3
    assert 0 <= report["dice_per_patient_mean"] <= 1
    port = int(re.search(r"API on port (\d+) stopped", text).group(1))
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # the server the notebook started is gone
    bad_upload = re.search(r"^(\d{3}) unsupported file type", text, re.MULTILINE)
    assert bad_upload and bad_upload.group(1).startswith("4")  # a client error with its reason, not a 500
