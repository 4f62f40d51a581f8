"""benchmarks/records.py + render_results.py: a table in docs/results.md is exactly what its JSON record holds."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


records, render = load("records"), load("render_results")
COLUMNS = [("defence", "{label}"), ("C-Acc (%)", "{c_acc:.1f}"), ("ASR (%)", "{asr_mean:.1f} ± {asr_std:.1f}")]
DOC = """# Results
intro
<!-- table:toy begin -->
old table
<!-- table:toy end -->
middle
<!-- table:gone begin -->
measured before the records
<!-- table:gone end -->
"""


def write_toy(out, c_acc=98.5):
    record = records.TableRecord("toy", argv=["benchmarks/toy.py", "--out", "x"])
    record.add_config("a", {"seed": 0, "model": {"lr": 0.002}})
    rows = [{"label": "no defence", "c_acc": c_acc, "asr_mean": 100.0, "asr_std": 0.0},
            {"label": "filter", "c_acc": 97.04}]  # no ASR: its cell shows "–"
    return record.write(out, COLUMNS, rows)


def test_record_holds_provenance_and_rows(tmp_path):
    payload = json.loads(write_toy(tmp_path).read_text())
    assert payload["command"].endswith("python benchmarks/toy.py --out x")
    assert len(payload["git"]["commit"]) == 40 and isinstance(payload["git"]["dirty"], bool)
    assert payload["machine"]["cores"] >= 1 and len(payload["machine"]["load_average"]) == 3
    assert payload["config_hash"] == records.config_hash({"a": {"model": {"lr": 0.002}, "seed": 0}})  # key order
    assert payload["config_hash"] != records.config_hash({"a": {"seed": 1, "model": {"lr": 0.002}}})
    assert payload["started"] <= payload["finished"] and payload["rows"][1]["c_acc"] == 97.04


def test_render_round_trip_stale_block_and_changed_number(tmp_path):
    write_toy(tmp_path)
    text, stale = render.render_results(DOC, tmp_path)
    assert stale == ["gone"] and "measured before the records\n" in text and "old table" not in text
    table = text.split("<!-- table:toy begin -->\n")[1].split("\n\n")[0].splitlines()
    assert table == ["| defence | C-Acc (%) | ASR (%) |", "|---|---|---|", "| no defence | 98.5 | 100.0 ± 0.0 |",
                     "| filter | 97.0 | – |"]
    assert "python benchmarks/toy.py --out x" in text and "configs sha256" in text
    assert render.render_results(text, tmp_path)[0] == text  # rendering is idempotent
    write_toy(tmp_path, c_acc=91.25)
    changed = render.render_results(text, tmp_path)[0]
    assert "| no defence | 91.2 | 100.0 ± 0.0 |" in changed and "98.5" not in changed


def test_mean_std_max():
    summary = records.mean_std_max([0.2, 0.4])
    assert summary["mean"] == pytest.approx(0.3) and summary["std"] == pytest.approx(0.1414213562)
    assert (summary["max"], summary["n"]) == (0.4, 2)
    assert records.mean_std_max([0.5])["std"] == 0.0


def test_a_value_in_a_sentence_is_rendered_from_its_row(tmp_path):
    write_toy(tmp_path, c_acc=91.25)
    sentence = ("accuracy <!-- value:toy/1/c_acc|.1f -->old<!-- /value --> vs "
                "<!-- value:toy/0/c_acc|.2f -->old<!-- /value -->; <!-- value:toy/1/asr_mean|.1f -->?<!-- /value -->")
    text, stale = render.render_results(sentence, tmp_path)
    assert text == ("accuracy <!-- value:toy/1/c_acc|.1f -->97.0<!-- /value --> vs "
                    "<!-- value:toy/0/c_acc|.2f -->91.25<!-- /value -->; "
                    "<!-- value:toy/1/asr_mean|.1f -->?<!-- /value -->")
    assert stale == ["toy/1/asr_mean"]  # the row has no such number: left as it is, reported
    assert render.render_results(text, tmp_path)[0] == text


def test_the_docs_and_readme_render_without_a_stale_block():
    """Every table block and value span of docs/results.md and README.md has its record (what --strict checks)."""
    root = BENCHMARKS.parent
    for document in (root / "docs" / "results.md", root / "README.md"):
        assert render.render_results(document.read_text(), root / "docs" / "records")[1] == [], document
