"""notebooks/quantization_quality.ipynb runs top to bottom on the bundled data, and says what it
should: the per-variant table, the report, which capability suffers most, flips, plots."""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quantization_quality.ipynb"


def _text(output) -> str:
    if output.output_type == "stream":
        return output.text
    if output.output_type in ("display_data", "execute_result"):
        data = output.get("data", {})
        return "\n".join(data.get(k, "") for k in ("text/plain", "text/markdown", "text/html"))
    return ""


@pytest.fixture(scope="module")
def executed():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails
    return nb


def test_stored_clean_and_small():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert NOTEBOOK.stat().st_size < 300_000
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_runs_without_errors_and_says_what_it_should(executed):
    from ppldelta.demo import load_demo

    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"
                and ("Traceback" in o.text or "Warning" in o.text)]
    text = "\n".join(_text(o) for o in outputs)
    data = load_demo()
    for v in data.variants:
        assert v in text
    assert data.meta["model"] in text and data.meta["gguf_sha256"] in text  # provenance is cited
    assert "suffers most" in text
    assert "'relative_delta_pct'" in text  # the reference dict itself
    assert "== llama.cpp statistics ==" in text  # print(report)
    assert "<table>" in text  # the report's HTML rendering
    assert "McNemar" in text  # flips on the multiple-choice items
    assert "within expected band" in text or "worse than expected" in text or "better than expected" in text
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 3  # expected bands, the 4-bit variant's panel, the KLD vs perplexity panel
