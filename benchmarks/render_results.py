"""Render table records (``benchmarks/records.py``) into ``docs/results.md``.

Every block between ``<!-- table:<name> begin -->`` and ``<!-- table:<name> end -->`` is replaced by the markdown
table of ``<records>/<name>.json`` and a provenance line under it (command, commit, machine, time, config hash), so
the numbers in the text are the numbers in the record. A cell whose format names a value the row lacks shows "–".
A number inside a sentence (here or in README.md) is rendered the same way from one row of a record:
``<!-- value:flagship_seeds/PureEBM/asr_x1_mean|.1f -->0.1<!-- /value -->``.

A block whose record is missing is left as it is and reported as stale on stderr (exit status 1 with ``--strict``):
the tables measured before the records existed keep their numbers, with a line inside their block naming the command
that regenerates them.

    python benchmarks/render_results.py [--records docs/records] [--results docs/results.md] [--strict]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w.-]+) begin -->\n)(?P<body>.*?)(<!-- table:(?P=name) end -->)", re.S)
# One number in a sentence: <!-- value:RECORD/ROW/KEY|FORMAT -->12.3<!-- /value --> (ROW: the row's "name", or its index)
VALUE = re.compile(r"(<!-- value:(?P<name>[\w.-]+)/(?P<row>[^/]+)/(?P<key>\w+)\|(?P<fmt>[^>]*?) -->)(?P<body>.*?)"
                   r"(?P<close><!-- /value -->)", re.S)


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
    threads = f"OMP_NUM_THREADS={m.get('OMP_NUM_THREADS') or 'unset'}, torch threads {m.get('torch_threads')}"
    if "cpu_native_bf16" in m:
        threads += ", CPU with native bf16" if m["cpu_native_bf16"] else ", CPU without native bf16 (fp32 training)"
    load = m.get("load_average_at_start") or m.get("load_average")
    reused = [name for name, run in record.get("runs", {}).items() if run.get("reused")]
    runs = f" {len(reused)} of {len(record['runs'])} runs reused from an earlier invocation ({', '.join(reused)})." \
        if reused else ""
    chips = ", ".join(name for name in (m.get("cpu_model"), m.get("gpu_model")) if name)
    chips = f" ({chips})" if chips else ""
    return (f"Record `{record['table']}.json`: `{record['command']}` at commit {commit}; {m.get('cores')} cores{chips}, load "
            f"average {' / '.join(f'{x:g}' for x in load)} at start, Python {m.get('python')}, torch {m.get('torch')}, "
            f"{threads}; {record['started']} – {record['finished']}; configs sha256 {record['config_hash'][:12]}."
            + runs + runs_at)


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

    def replace_value(match: re.Match) -> str:
        path = records / f"{match['name']}.json"
        rows = json.loads(path.read_text())["rows"] if path.is_file() else []
        row = next((r for i, r in enumerate(rows) if r.get("name") == match["row"] or str(i) == match["row"]), None)
        if row is None or match["key"] not in row:
            stale.append(f"{match['name']}/{match['row']}/{match['key']}")
            return match.group(0)
        return match.group(1) + format(row[match["key"]], match["fmt"]) + match["close"]

    return VALUE.sub(replace_value, BLOCK.sub(replace, text)), stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=Path, default=ROOT / "docs" / "records", help="folder of <table>.json")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="also rendered: its value spans")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a block or value has no record")
    args = parser.parse_args()
    stale = []
    for document in (args.results, args.readme):
        text, missing = render_results(document.read_text(), args.records)
        document.write_text(text)
        stale += missing
    for name in stale:
        print(f"{name} is stale: {args.records} has no record (or row, or key) for it; left as it is",
              file=sys.stderr)
    sys.exit(1 if stale and args.strict else 0)


if __name__ == "__main__":
    main()
