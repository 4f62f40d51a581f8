"""benchmarks/records.py + render_results.py: a table in the docs is exactly what its JSON record holds, a record
whose measured code changed since it was written is reported stale, and no number in a docs table is hand-written."""
import importlib.util
import json
import subprocess
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
ROOT = BENCHMARKS.parent
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
    record = records.TableRecord("toy", depends_on=["lit_robust/functional/ispl.py"],
                                 argv=["benchmarks/ispl_badnets_table.py", "--out", "x"])
    record.add_config("a", {"seed": 0, "model": {"lr": 0.002}})
    record.add_run("a", reused=True, started="2026-01-01T00:00:00Z", finished="2026-01-01T01:00:00Z")
    record.add_run("b", reused=True, started="2026-01-01T12:00:00Z", finished="2026-01-02T00:00:00Z")
    rows = [{"label": "no defence", "c_acc": c_acc, "asr_mean": 100.0, "asr_std": 0.0, "asr_per_seed": [100.0, 100.0]},
            {"label": "filter", "c_acc": 97.04}]  # no ASR: its cell shows "–"
    return record.write(out, COLUMNS, rows)


def test_record_holds_provenance_and_rows(tmp_path):
    payload = json.loads(write_toy(tmp_path).read_text())
    assert payload["command"].endswith("python benchmarks/ispl_badnets_table.py --out x")
    # the script is a dependency too; the CPU model and the data cache state are always there
    assert payload["depends_on"] == ["lit_robust/functional/ispl.py", "benchmarks/ispl_badnets_table.py"]
    assert "cpu_model" in payload["machine"] and payload["data_cache"]["state"] in ("empty", "reused")
    assert len(payload["git"]["commit"]) == 40 and isinstance(payload["git"]["dirty"], bool)
    assert payload["machine"]["cores"] >= 1 and len(payload["machine"]["load_average"]) == 3
    assert payload["config_hash"] == records.config_hash({"a": {"model": {"lr": 0.002}, "seed": 0}})  # key order
    assert payload["config_hash"] != records.config_hash({"a": {"seed": 1, "model": {"lr": 0.002}}})
    assert payload["started"] <= payload["finished"] and payload["rows"][1]["c_acc"] == 97.04
    assert payload["runs_span"] == ["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"]  # the reused runs' own times


def test_render_round_trip_stale_block_and_changed_number(tmp_path):
    write_toy(tmp_path)
    text, stale = render.render_results(DOC, tmp_path)
    assert stale == ["gone"] and "measured before the records\n" in text and "old table" not in text
    table = text.split("<!-- table:toy begin -->\n")[1].split("\n\n")[0].splitlines()
    assert table == ["| defence | C-Acc (%) | ASR (%) |", "|---|---|---|", "| no defence | 98.5 | 100.0 ± 0.0 |",
                     "| filter | 97.0 | – |"]
    assert "python benchmarks/ispl_badnets_table.py --out x" in text and "configs sha256" in text
    assert " Data cache empty at start." in text or " Data cache reused at start." in text
    assert "Runs ran 2026-01-01T00:00:00Z – 2026-01-02T00:00:00Z." in text
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


def test_a_ratio_in_a_sentence_divides_two_numbers_of_one_record(tmp_path):
    write_toy(tmp_path, c_acc=48.52)
    sentence = "<!-- value:toy/1/c_acc÷0/c_acc|.2f -->?<!-- /value -->× and <!-- value:toy/1/c_acc÷1/asr_mean|.1f -->?<!-- /value -->"
    text, stale = render.render_results(sentence, tmp_path)
    assert text.startswith("<!-- value:toy/1/c_acc÷0/c_acc|.2f -->2.00<!-- /value -->×")  # 97.04 / 48.52
    assert stale == ["toy/1/c_acc÷1/asr_mean"]  # the denominator is missing: left as it is, reported


def test_a_record_refuses_missing_dependencies_and_a_mean_without_its_seeds(tmp_path):
    with pytest.raises(ValueError, match="depends_on is empty"):
        records.TableRecord("toy", depends_on=[], argv=["x.py"])
    with pytest.raises(ValueError, match="lit_robust/no_such_module.py"):
        records.TableRecord("toy", depends_on=["lit_robust/no_such_module.py"], argv=["x.py"])
    record = records.TableRecord("toy", depends_on=["lit_robust/functional/ispl.py"], argv=["x.py"])
    with pytest.raises(ValueError, match=r"\['asr_per_seed'\]"):
        record.write(tmp_path, COLUMNS, [{"label": "a", "asr_mean": 1.0, "asr_std": 0.0}])
    assert not (tmp_path / "toy.json").exists()  # refused before anything is written


def test_data_cache_state_says_empty_or_reused(tmp_path):
    assert records.data_cache_state(tmp_path / "absent")["state"] == "empty"
    (tmp_path / "digits").mkdir()
    assert records.data_cache_state(tmp_path)["state"] == "empty"
    (tmp_path / "digits" / "x.npz").write_bytes(b"1")
    assert records.data_cache_state(tmp_path) == {"path": str(tmp_path), "state": "reused"}


def git(repo, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def commit_files(repo, **files):
    for name, text in files.items():
        (repo / name).write_text(text)
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "change")
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path):
    git(tmp_path, "init", "-q")
    return tmp_path


def stale_record(commit, depends_on=("model.py", "run.py"), changed=()):
    """A record as written at ``commit``, with every provenance field the check asks for."""
    return {"git": {"commit": commit, "dirty": bool(changed), "changed": list(changed)}, "depends_on": list(depends_on),
            "machine": {"cpu_model": "cpu"}, "data_cache": {"state": "empty"},
            "rows": [{"acc_mean": 1.0, "acc_per_seed": [1.0]}]}


def test_git_state_counts_untracked_files_as_dirty(repo):
    commit_files(repo, **{"model.py": "a"})
    assert records.git_state(repo)["dirty"] is False
    (repo / "new.py").write_text("b")
    assert records.git_state(repo)["changed"] == ["new.py"]


def test_a_record_is_stale_once_a_dependency_changes_after_its_commit(repo):
    written = commit_files(repo, **{"model.py": "a", "run.py": "b", "notes.md": "c"})
    history = render.GitHistory(repo)
    assert render.staleness(stale_record(written), history) == []
    after_docs = commit_files(repo, **{"notes.md": "d"})  # not a dependency: still current
    assert render.staleness(stale_record(written), history) == []
    changed = commit_files(repo, **{"model.py": "a2"})
    assert render.staleness(stale_record(written), history) == [
        f"changed after its commit {written[:10]}: model.py (in {changed[:10]})"]
    assert render.staleness(stale_record(after_docs), history) != []  # an older commit than the change
    assert render.staleness(stale_record(changed), history) == []  # rewritten after the change: current


def test_a_record_reusing_runs_from_before_a_change_is_stale(repo):
    trained = commit_files(repo, **{"model.py": "a", "run.py": "b"})
    changed = commit_files(repo, **{"model.py": "a2"})
    history = render.GitHistory(repo)
    record = stale_record(changed)
    record["runs"] = {"fresh": {"git": {"commit": changed}}, "old": {"git": {"commit": trained}, "reused": True}}
    assert render.staleness(record, history) == [f"its run old was trained at {trained[:10]}, before model.py changed"]
    record["runs"]["old"] = {"reused": True}  # reused, no commit: its age is unknown
    assert render.staleness(record, history) == ["its run old was reused without the commit it was trained at"]
    record["runs"]["old"] = {"git": {"commit": changed}, "reused": True}
    assert render.staleness(record, history) == []


def test_no_commit_uncommitted_edits_unknown_paths_and_missing_provenance_are_stale(repo):
    written = commit_files(repo, **{"model.py": "a", "run.py": "b"})
    history = render.GitHistory(repo)
    assert render.staleness(stale_record(None), history) == ["names no commit"]
    assert render.staleness(stale_record(written, changed=["run.py", "x.md"]), history) == [
        "was written with uncommitted changes to run.py"]
    assert render.staleness(stale_record(written, depends_on=["gone.py"]), history) == [
        "depends on gone.py, which no commit holds"]
    assert render.staleness(stale_record(written, depends_on=[]), history) == [
        "lists no depends_on paths, so its age cannot be checked"]
    assert render.staleness(stale_record("0" * 40), history) == [
        "its commit 0000000000 is not in this repository's history"]
    bare = {"git": {"commit": written}, "depends_on": ["model.py"], "rows": [{"acc_mean": 1.0}]}
    assert render.staleness(bare, history) == [
        "lacks the CPU model; the data cache state; the per-seed values of acc_mean"]


def test_a_shallow_clone_or_no_git_is_refused_with_the_fix(repo, tmp_path_factory):
    commit_files(repo, **{"model.py": "a"})
    commit_files(repo, **{"model.py": "b"})
    shallow = tmp_path_factory.mktemp("shallow") / "clone"
    git(repo, "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow))
    with pytest.raises(RuntimeError, match="git fetch --unshallow"):
        render.GitHistory(shallow)
    with pytest.raises(RuntimeError, match="not in a git checkout"):
        render.GitHistory(tmp_path_factory.mktemp("plain"))


def test_stale_records_name_the_record_the_reason_and_the_command(repo):
    written = commit_files(repo, **{"model.py": "a", "run.py": "b"})
    changed = commit_files(repo, **{"run.py": "c"})
    (repo / "records").mkdir()
    (repo / "records" / "toy.json").write_text(json.dumps({**stale_record(written), "command": "python run.py"}))
    assert render.stale_records({"toy", "absent"}, repo / "records", render.GitHistory(repo)) == [
        f"toy.json is stale: changed after its commit {written[:10]}: run.py (in {changed[:10]}). Rerun: python run.py"]


def test_a_record_no_document_renders_is_reported(tmp_path):
    (tmp_path / "shown.json").write_text("{}")
    (tmp_path / "orphan.json").write_text("{}")
    assert render.unrendered_records({"shown"}, tmp_path) == [
        "orphan.json is rendered by no document: add its block or delete it"]


HAND = """| run | acc |
|---|---|
| a | 91.5 |
<!-- table:toy begin -->
| b | 92.0 |
<!-- table:toy end -->
It takes 3.5 min and 12 s, reaching 71 % (<!-- value:toy/0/c_acc|.1f -->98.5<!-- /value --> %); 3 seeds, 8×8 px.
"""


def test_hand_written_table_rows_and_measurements_are_found():
    assert render.hand_table_rows(HAND) == ["| a | 91.5 |"]  # the header has no digit, the block is rendered
    assert render.hand_measurements(HAND) == ["3.5 min", "12 s", "71 %"]


def test_the_docs_and_readme_render_without_a_missing_record_or_hand_numbers():
    """Every table block and value span of docs/*.md and README.md has its record, no docs table row holds a number
    outside a rendered block, and the README states no percentage or time that is not rendered."""
    for document in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]:
        text = document.read_text()
        assert render.render_results(text, ROOT / "docs" / "records")[1] == [], document
        if document.name != "README.md":  # the README's method tables cite chapters, not measurements
            assert render.hand_table_rows(text) == [], document
        assert render.spans_opening_a_line(text) == [], document
    assert render.hand_measurements((ROOT / "README.md").read_text()) == []


def test_a_line_opening_with_a_value_span_is_found():
    text = "acc\n<!-- value:toy/0/c_acc|.1f -->1<!-- /value --> %\nof <!-- value:toy/0/c_acc|.1f -->1<!-- /value -->"
    assert render.spans_opening_a_line(text) == ["<!-- value:toy/0/c_acc|.1f -->1<!-- /value --> %"]
