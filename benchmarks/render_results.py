"""Render table records (``benchmarks/records.py``) into every ``docs/*.md`` and ``README.md``, and check them.

Every block between ``<!-- table:<name> begin -->`` and ``<!-- table:<name> end -->`` is replaced by the markdown
table of ``<records>/<name>.json`` and a provenance line under it (command, commit, machine, time, config hash), so
the numbers in the text are the numbers in the record. A cell whose format names a value the row lacks shows "–".
A number inside a sentence (here or in README.md) is rendered the same way from one row of a record:
``<!-- value:flagship_seeds/PureEBM/asr_x1_mean|.1f -->0.1<!-- /value -->``; a ratio of two numbers of one record
as ``<!-- value:cshtest_pendulum/lossy/loss÷truth/loss|.1f -->7.0<!-- /value -->``.

Reported on stderr (exit status 1 with ``--strict``), each line naming the record or document and why:

- a block or value whose record (or row, or key) is missing: left as it is;
- a stale record: its commit is not a descendant of the last commit that changed one of its ``depends_on`` paths, it
  names no commit or no ``depends_on``, it was written with uncommitted changes to one of those paths, or it lacks the
  provenance every record carries (CPU model, data cache state, per-seed values beside a mean), or it reused a run
  trained before such a change (or at a commit it does not name);
- a record that no block or value span renders;
- a hand-written number: a markdown table row with a digit outside a rendered block in ``docs/*.md``, or a percentage
  or time in README.md outside a block or value span.

    python benchmarks/render_results.py [--records docs/records] [--docs docs] [--readme README.md] [--strict]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w.-]+) begin -->\n)(?P<body>.*?)(<!-- table:(?P=name) end -->)", re.S)
# One number in a sentence: <!-- value:RECORD/ROW/KEY|FORMAT -->12.3<!-- /value --> (ROW: the row's "name", or its index),
# or the ratio of two numbers of the record: <!-- value:RECORD/ROW/KEY÷ROW2/KEY2|FORMAT -->
VALUE = re.compile(r"(<!-- value:(?P<name>[\w.-]+)/(?P<row>[^/÷]+)/(?P<key>\w+)(?:÷(?P<row2>[^/]+)/(?P<key2>\w+))?"
                   r"\|(?P<fmt>[^>]*?) -->)(?P<body>.*?)"
                   r"(?P<close><!-- /value -->)", re.S)


# A measured percentage or time in prose: "71 %", "3.5 min", "12 s", "≈ 7 minutes", "40 ms", "2 h"
MEASURED = re.compile(r"\d(?:[\d,.]*\d)?\s?(?:%|ms\b|s\b|sec\b|seconds?\b|min\b|minutes?\b|h\b|hours?\b)")


def cell(fmt: str, row: dict) -> str:
    try:
        return fmt.format_map(row)
    except (KeyError, ValueError, TypeError):
        return "–"


def describe_commit(git: dict) -> str:
    """``abc1234567`` or ``abc1234567 (uncommitted: a.py, b.md)``: which tracked files differed from the commit."""
    commit = (git.get("commit") or "unknown")[:10]
    if not git.get("dirty"):
        return commit
    changed = git.get("changed") or []
    return commit + (f" (uncommitted: {', '.join(changed)})" if changed else " (uncommitted changes)")


def provenance(record: dict) -> str:
    """One line: the command, commit (dirty flag), machine, time and config hash the table came from."""
    git, m = record["git"], record["machine"]
    commit = describe_commit(git)
    run_commits = sorted({describe_commit(run["git"]) for run in record.get("runs", {}).values() if run.get("git")})
    runs_at = f" Runs trained at commit {', '.join(run_commits)}." if run_commits and run_commits != [commit] else ""
    span = record.get("runs_span")
    runs_at += f" Runs ran {span[0]} – {span[1]}." if span and span != [record["started"], record["finished"]] else ""
    threads = f"OMP_NUM_THREADS={m.get('OMP_NUM_THREADS') or 'unset'}, torch threads {m.get('torch_threads')}"
    if "cpu_native_bf16" in m:
        threads += ", CPU with native bf16" if m["cpu_native_bf16"] else ", CPU without native bf16 (fp32 training)"
    load = m.get("load_average_at_start") or m.get("load_average")
    reused = [name for name, run in record.get("runs", {}).items() if run.get("reused")]
    runs = f" {len(reused)} of {len(record['runs'])} runs reused from an earlier invocation ({', '.join(reused)})." \
        if reused else ""
    chips = ", ".join(name for name in (m.get("cpu_model"), m.get("gpu_model")) if name)
    chips = f" ({chips})" if chips else ""
    cache = f" Data cache {record['data_cache']['state']} at start." if record.get("data_cache") else ""
    return (f"Record `{record['table']}.json`: `{record['command']}` at commit {commit}; {m.get('cores')} cores{chips}, load "
            f"average {' / '.join(f'{x:g}' for x in load)} at start, Python {m.get('python')}, torch {m.get('torch')}, "
            f"{threads}; {record['started']} – {record['finished']}; configs sha256 {record['config_hash'][:12]}."
            + cache + runs + runs_at)


def render_table(record: dict) -> str:
    """The record's rows as a markdown table, then its provenance line."""
    headers = [c["header"] for c in record["columns"]]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c["format"], row) for c in record["columns"]) + " |" for row in record["rows"]]
    return "\n".join(lines) + "\n\n" + provenance(record) + "\n"


def render_results(text: str, records: Path) -> tuple[str, list[str]]:
    """``text`` with every block whose record exists re-rendered; also the names of the blocks left stale."""
    stale = []

    def replace(match: re.Match) -> str:
        path = records / f"{match['name']}.json"
        if not path.is_file():
            stale.append(match["name"])
            return match.group(0)
        return match.group(1) + render_table(json.loads(path.read_text())) + match.group(4)

    def number(rows: list[dict], name: str, key: str) -> float | None:
        row = next((r for i, r in enumerate(rows) if r.get("name") == name or str(i) == name), None)
        return None if row is None else row.get(key)

    def replace_value(match: re.Match) -> str:
        path = records / f"{match['name']}.json"
        rows = json.loads(path.read_text())["rows"] if path.is_file() else []
        value = number(rows, match["row"], match["key"])
        if match["row2"] is not None and value is not None:
            denominator = number(rows, match["row2"], match["key2"])
            value = None if not denominator else value / denominator
        if value is None:
            stale.append(match.group(1)[len("<!-- value:"):-len(" -->")].split("|")[0])
            return match.group(0)
        return match.group(1) + format(value, match["fmt"]) + match["close"]

    return VALUE.sub(replace_value, BLOCK.sub(replace, text)), stale


def outside_rendered(text: str) -> str:
    """``text`` without its rendered blocks and value spans: what a person wrote by hand."""
    return VALUE.sub("", BLOCK.sub("", text))


def hand_table_rows(text: str) -> list[str]:
    """Markdown table rows holding a digit outside any rendered block: numbers no record backs."""
    return [line for line in outside_rendered(text).splitlines()
            if line.lstrip().startswith("|") and re.search(r"\d", line)]


def hand_measurements(text: str) -> list[str]:
    """Percentages and times in ``text`` outside any rendered block or value span (README.md must render them)."""
    return [match.group(0) for match in MEASURED.finditer(outside_rendered(text))]


def spans_opening_a_line(text: str) -> list[str]:
    """Lines that begin with a value span: markdown reads a line opening with ``<!--`` as a raw HTML block, which
    breaks the paragraph and shows the line unformatted; start the line with a word instead."""
    return [line for line in text.splitlines() if line.startswith("<!-- value:")]


def rendered_records(text: str) -> set[str]:
    """The names of the records a document's blocks and value spans render."""
    return {match["name"] for match in BLOCK.finditer(text)} | {match["name"] for match in VALUE.finditer(text)}


class GitHistory:
    """The repository's history, asked which commit last changed a path and whether one commit descends from another;
    refuses a shallow clone or a folder outside git with an error that says how to get the history."""

    def __init__(self, folder: Path):
        self.root = folder
        try:
            self.root = Path(self.git("rev-parse", "--show-toplevel"))  # depends_on paths are relative to it
            shallow = self.git("rev-parse", "--is-shallow-repository")
        except (OSError, subprocess.CalledProcessError) as error:
            raise RuntimeError(f"{folder} is not in a git checkout: the staleness of the records is read from the "
                               "history; run this in a clone of the repository") from error
        if shallow == "true":
            raise RuntimeError(f"{self.root} is a shallow clone: the commits that changed the records' dependencies "
                               "are missing; run `git fetch --unshallow` and render again")

    def git(self, *args: str) -> str:
        return subprocess.run(["git", *args], cwd=self.root, capture_output=True, text=True, check=True).stdout.strip()

    def has_commit(self, commit: str) -> bool:
        try:
            return self.git("cat-file", "-t", commit) == "commit"
        except subprocess.CalledProcessError:
            return False

    def last_change(self, path: str) -> str:
        """The last commit that changed ``path`` (a file or folder), "" when no commit has."""
        return self.git("log", "-1", "--format=%H", "--", path)

    def descends(self, commit: str, ancestor: str) -> bool:
        return subprocess.run(["git", "merge-base", "--is-ancestor", ancestor, commit], cwd=self.root,
                              capture_output=True).returncode == 0


def missing_provenance(record: dict) -> list[str]:
    """What a record lacks of the provenance every table carries."""
    lacking = [] if record.get("machine", {}).get("cpu_model") else ["the CPU model"]
    lacking += [] if record.get("data_cache") else ["the data cache state"]
    no_seeds = sorted({key for row in record.get("rows", []) for key in row
                       if key.endswith("_mean") and not row.get(key[:-len("_mean")] + "_per_seed")})
    return lacking + ([f"the per-seed values of {', '.join(no_seeds)}"] if no_seeds else [])


def staleness(record: dict, history: GitHistory) -> list[str]:
    """Why the record no longer measures the code it names ([] when current): the commit it was written at must
    descend from the last commit that changed each path in its ``depends_on``, with none of them edited uncommitted."""
    depends_on, git = record.get("depends_on") or [], record.get("git") or {}
    commit = git.get("commit")
    reasons = [] if depends_on else ["lists no depends_on paths, so its age cannot be checked"]
    if not commit:
        return reasons + ["names no commit"]
    if not history.has_commit(commit):
        return reasons + [f"its commit {commit[:10]} is not in this repository's history"]
    edited = [path for path in git.get("changed") or [] for dep in depends_on
              if path == dep or path.startswith(dep.rstrip("/") + "/")]
    reasons += [f"was written with uncommitted changes to {', '.join(edited)}"] if edited else []
    last_changes = {path: history.last_change(path) for path in depends_on}
    unknown = [path for path, last in last_changes.items() if not last]
    reasons += [f"depends on {', '.join(unknown)}, which no commit holds"] if unknown else []
    newer = [f"{path} (in {last_changes[path][:10]})" for path in changed_after(commit, last_changes, history)]
    reasons += [f"changed after its commit {commit[:10]}: {', '.join(newer)}"] if newer else []
    reasons += [f"its run {name} {why}" for name, why in stale_runs(record, last_changes, history)]
    lacking = missing_provenance(record)
    return reasons + ([f"lacks {'; '.join(lacking)}"] if lacking else [])


def changed_after(commit: str, last_changes: dict[str, str], history: GitHistory) -> list[str]:
    """The paths whose last change (``last_changes``: path → commit) ``commit`` does not descend from."""
    return [path for path, last in last_changes.items() if last and not history.descends(commit, last)]


def stale_runs(record: dict, last_changes: dict[str, str], history: GitHistory) -> list[tuple[str, str]]:
    """Runs a record reused from an earlier invocation that no longer measure its dependencies: trained at a commit
    older than a dependency's last change, or at an unknown commit."""
    stale = []
    for name, run in (record.get("runs") or {}).items():
        commit = (run.get("git") or {}).get("commit")
        if not commit:
            if run.get("reused"):
                stale.append((name, "was reused without the commit it was trained at"))
            continue
        if not history.has_commit(commit):
            stale.append((name, f"was trained at {commit[:10]}, not in this repository's history"))
            continue
        newer = changed_after(commit, last_changes, history)
        if newer:
            stale.append((name, f"was trained at {commit[:10]}, before {', '.join(newer)} changed"))
    return stale


def stale_records(names: set[str], records: Path, history: GitHistory) -> list[str]:
    """One line per stale record among ``names`` that exist: the record, why, and the command that reruns it."""
    lines = []
    for name in sorted(names):
        path = records / f"{name}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            reasons = staleness(record, history)
            lines += [f"{path.name} is stale: {'; '.join(reasons)}. Rerun: {record.get('command')}"] if reasons else []
    return lines


def unrendered_records(names: set[str], records: Path) -> list[str]:
    """Records no document renders: one record per table, one table per record."""
    return [f"{path.name} is rendered by no document: add its block or delete it"
            for path in sorted(records.glob("*.json")) if path.stem not in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=Path, default=ROOT / "docs" / "records", help="folder of <table>.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="every *.md in it is rendered and checked")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="also rendered and checked")
    parser.add_argument("--strict", action="store_true", help="exit 1 when anything below is reported")
    args = parser.parse_args()
    problems, names = [], set()
    for document in [*sorted(args.docs.glob("*.md")), args.readme]:
        text, missing = render_results(document.read_text(), args.records)
        document.write_text(text)
        names |= rendered_records(text)
        problems += [f"{document.name}: {name} has no record (or row, or key) in {args.records}; left as it is"
                     for name in missing]
        if document == args.readme:  # its method tables cite chapters; its measured numbers are the check
            problems += [f"{document.name}: {found!r} is not rendered from a record (use a value span)"
                         for found in hand_measurements(text)]
        else:
            problems += [f"{document.name}: table row with numbers outside a rendered block: {row.strip()[:100]}"
                         for row in hand_table_rows(text)]
        problems += [f"{document.name}: a line begins with a value span (markdown ends the paragraph there): "
                     f"{line[:80]}" for line in spans_opening_a_line(text)]
    problems += unrendered_records(names, args.records)
    try:
        problems += stale_records(names, args.records, GitHistory(args.records.resolve()))
    except RuntimeError as error:
        problems.append(f"staleness not checked: {error}")
    for line in problems:
        print(line, file=sys.stderr)
    sys.exit(1 if problems and args.strict else 0)


if __name__ == "__main__":
    main()
