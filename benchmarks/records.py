"""Table records: every table command in ``benchmarks/`` writes ``<out>/<table>.json`` through :class:`TableRecord`,
and ``benchmarks/render_results.py`` turns those JSONs into the tables of ``docs/results.md`` (issue #29: text and
numbers cannot drift).

A record holds the command line, the resolved config of each run and one hash over them, ``git rev-parse HEAD`` with a
dirty flag (untracked files count), the paths the numbers depend on (``depends_on``: modules, configs and the script,
which ``render_results.py --strict`` compares with the git history to find stale records), the machine (CPU model,
cores, load average, Python/torch versions, OMP threads), whether the data cache was empty or reused, start and end
time, the columns (a header and a format string applied to each row with ``str.format_map``) and the rows (plain
numbers, strings; a row's ``<x>_mean`` comes with ``<x>_per_seed``, the values it averages).

    record = TableRecord("ispl_badnets", depends_on=["lit_robust/functional/ispl.py",
                                                     "conf/experiment/ispl_badnets_digits.yaml"], title="...")
    record.add_config("none", resolved_config_dict)
    record.write(out, columns=[("defence", "{name}"), ("C-Acc (%)", "{c_acc:.1f}")], rows=[{...}, ...])
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV_SHOWN = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def git_state(root: Path = ROOT) -> dict:
    """HEAD's commit, whether the tree differs from it (tracked edits and untracked files that git does not ignore:
    either could have changed the numbers) and which paths, so a reader can see whether the uncommitted edits could
    have touched the numbers (docs, tests) or not."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout
    try:
        # porcelain lines are "XY path" (a rename: "XY old -> new"): the path is after the two status letters
        status = git("status", "--porcelain", "--untracked-files=all").splitlines()
        changed = [line[3:].split(" -> ")[-1] for line in status]
        return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(changed), "changed": changed}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def cpu_model() -> str | None:
    """The processor's name as the kernel reports it (``model name`` in /proc/cpuinfo), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine() -> dict:
    """What the timings and any thread-dependent numbers depend on: the CPU model and, when CUDA is present, the GPU
    model beside the core count, load and versions."""
    import torch

    from lit_robust.machine import native_bf16_on_cpu
    return {"cpu_model": cpu_model(), "gpu_model": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "cuda": torch.cuda.is_available(),
            # the classifiers train in bf16 where the CPU computes it natively (lit_robust.machine.fast_precision)
            "cpu_native_bf16": native_bf16_on_cpu(),
            **{name: os.environ.get(name) for name in ENV_SHOWN}}


def data_cache_state(data_dir: str | Path | None = None) -> dict:
    """The data folder (``$LIT_ROBUST_DATA``, else ``data/`` in the repository, as the configs resolve it) and whether
    it held files when the table started: ``empty`` means datasets were downloaded and poisons crafted during the runs
    (their time is in the timings), ``reused`` means cached ones were read."""
    folder = Path(data_dir or os.environ.get("LIT_ROBUST_DATA") or "data")
    folder = folder if folder.is_absolute() else ROOT / folder
    # the first file decides: a dataset folder can hold millions
    held = folder.is_dir() and any(path.is_file() for path in folder.rglob("*"))
    return {"path": str(folder), "state": "reused" if held else "empty"}


def checked_dependencies(paths: list[str], script: str | None, root: Path = ROOT) -> list[str]:
    """``paths`` (relative to the repository) and the script, each checked to exist, so that a typo cannot hide a
    stale record: ``render_results.py --strict`` compares the last commit that changed any of them with the record's."""
    if not paths:
        raise ValueError("depends_on is empty: list the modules and configs the table measures "
                         "(e.g. ['lit_robust/models/ebm.py', 'conf/experiment/ebm_digits.yaml'])")
    listed = [*paths, *([script] if script and script not in paths else [])]
    missing = [path for path in listed if not (root / path).exists()]
    if missing:
        raise ValueError(f"depends_on names {missing}, which do not exist under {root}: give paths relative to the "
                         "repository root")
    return listed


def check_per_seed(rows: list[dict]) -> None:
    """Every ``<x>_mean`` in a row comes with ``<x>_per_seed``, the values it averages, so the spread can be checked."""
    for index, row in enumerate(rows):
        lacking = [key for key in row if key.endswith("_mean") and not row.get(key[:-len("_mean")] + "_per_seed")]
        if lacking:
            raise ValueError(f"row {index} ({row.get('name', '')}) has {lacking} without the per-seed values: add "
                             f"{[key[:-len('_mean')] + '_per_seed' for key in lacking]} (a list)")


def config_hash(configs: dict) -> str:
    """sha256 of the resolved configs as canonical JSON (sorted keys), so equal configs hash equal."""
    return hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()


def script_path(argv: list[str]) -> str:
    """The script as a path relative to the repository when it lies inside it, else as invoked."""
    script = Path(argv[0]).resolve()
    return str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else argv[0]


def command_line(argv: list[str] | None = None) -> str:
    """The invocation as one shell line, prefixed with the thread variables that were set."""
    env = [f"{name}={os.environ[name]}" for name in ENV_SHOWN[:2] if name in os.environ]
    argv = argv if argv is not None else sys.argv
    shown = script_path(argv)
    return shlex.join(["python", shown, *argv[1:]]) if not env else " ".join(env) + " " + shlex.join(
        ["python", shown, *argv[1:]])


class TableRecord:
    """One table's provenance: started when constructed, written with its rows by :meth:`write`. ``depends_on``: the
    modules and configs whose change makes the numbers stale (the script is added)."""

    def __init__(self, table: str, depends_on: list[str], title: str = "", argv: list[str] | None = None):
        argv = argv if argv is not None else sys.argv
        self.table, self.title = table, title
        script = script_path(argv)
        self.depends_on = checked_dependencies(depends_on, script if (ROOT / script).is_file() else None)
        self.command = command_line(argv)
        self.started = utc_now()
        self.git = git_state()
        self.data_cache = data_cache_state()
        self.load_at_start = list(os.getloadavg())
        self.configs: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.notes: list[str] = []

    def add_config(self, name: str, config: dict) -> None:
        self.configs[name] = config

    def add_run(self, name: str, **info) -> None:
        """Per-run provenance (run dir, reused or run now, seconds, ...)."""
        self.runs[name] = info

    def runs_span(self) -> list[str] | None:
        """When the runs behind the table ran (first start, last end): a table of reused runs is written in seconds,
        long after the runs themselves."""
        started = [run["started"] for run in self.runs.values() if run.get("started")]
        finished = [run["finished"] for run in self.runs.values() if run.get("finished")]
        return [min(started), max(finished)] if started and finished else None

    def payload(self, columns: list[tuple[str, str]], rows: list[dict]) -> dict:
        check_per_seed(rows)
        return {"table": self.table, "title": self.title, "command": self.command, "git": self.git,
                "depends_on": self.depends_on, "data_cache": self.data_cache,
                "machine": {**machine(), "load_average_at_start": [round(x, 2) for x in self.load_at_start]},
                "started": self.started, "finished": utc_now(), "runs_span": self.runs_span(),
                "config_hash": config_hash(self.configs),
                "configs": self.configs, "runs": self.runs, "notes": self.notes,
                "columns": [{"header": header, "format": fmt} for header, fmt in columns], "rows": rows}

    def write(self, out: Path, columns: list[tuple[str, str]], rows: list[dict]) -> Path:
        """Write ``<out>/<table>.json`` atomically and return its path; a ``<x>_mean`` without ``<x>_per_seed`` is
        refused before anything is written."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.table}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.payload(columns, rows), indent=1, sort_keys=False) + "\n")
        os.replace(tmp, path)
        return path


def table_arguments(doc: str, default_out: str, runs, seeds: list[int] | None = None) -> tuple[object, list[str], Path]:
    """A table command's ``--out`` (resolved under the repository), ``--only`` (a subset of ``runs``) and, given
    default ``seeds``, ``--seeds``; the remaining arguments are Hydra overrides for every run."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", default=default_out, help="folder for the runs and the table")
    parser.add_argument("--only", nargs="*", choices=list(runs), default=list(runs), help="subset of the runs")
    if seeds is not None:
        parser.add_argument("--seeds", type=int, nargs="+", default=seeds, help="a run per seed")
    args, extra = parser.parse_known_args()
    return args, extra, (ROOT / args.out).resolve()


def running_elsewhere(run_dir: Path) -> bool:
    """Whether another live invocation is running this run now (``<run>/.running`` holds its pid), so that several
    invocations with different ``--only`` can share one ``--out`` (one per core); the last one writes the table."""
    marker = run_dir / ".running"
    try:
        os.kill(int(marker.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def first_adversarial_recipe(batch_size: int = 128) -> list[str]:
    """Overrides that give ``adv_train_digits`` its first recipe (8-16-32 channels, 5 attack steps, ε warmed up over
    2 of 10 epochs, the best clean-validation checkpoint), from before it was retuned for issue 32: the tables made
    with it (robust transfer, the DDP check) stay reproducible."""
    return ["model.backbone_kwargs={widths:[8,16,32]}", "model.attack_steps=5", "model.eps_warmup_epochs=2",
            "model.lr=2e-3", f"data.batch_size={batch_size}", "trainer.max_epochs=10",
            "callbacks.model_checkpoint.monitor=val/acc"]


def train_run(run_dir: Path, overrides: list[str], done_key: str = "test/acc",
              script: str = "train.py") -> tuple[dict, dict]:
    """``train.py <overrides>`` (or ``evaluate.py``) into ``run_dir`` unless a finished run (``done_key`` in its
    ``metrics.json``) is there; returns the run's metrics and its provenance (``<run>/provenance.json``, written when
    launched here; ``({}, {})`` when another live invocation is running it)."""
    from lit_robust.storage.json_files import write_json_atomic

    metrics_path, provenance_path = run_dir / "metrics.json", run_dir / "provenance.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if done_key in metrics:
        provenance = json.loads(provenance_path.read_text()) if provenance_path.exists() else {}
        return metrics, {"reused": True, **provenance}
    if running_elsewhere(run_dir):
        print(f"{run_dir} is being run by another invocation: skipped (rerun this command when it is done)")
        return {}, {}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".running").write_text(str(os.getpid()))
    command = [sys.executable, script, f"hydra.run.dir={run_dir}", "callbacks.rich_progress_bar=null", *overrides]
    print("+", " ".join(command), flush=True)
    started, clock = utc_now(), time.monotonic()
    git, load = git_state(), machine()["load_average"]
    try:
        subprocess.run(command, cwd=ROOT, check=True)
    finally:
        (run_dir / ".running").unlink(missing_ok=True)
    write_json_atomic(provenance_path, {"overrides": overrides, "git": git, "started": started,
                                        "finished": utc_now(), "seconds": round(time.monotonic() - clock, 1),
                                        "load_average_at_start": load, "machine": machine()})
    return json.loads(metrics_path.read_text()), {"reused": False, **json.loads(provenance_path.read_text())}


def recorded_runs(record: "TableRecord", runs: list[tuple[Path, list[str], str]]) -> list[dict] | None:
    """:func:`train_run` each ``(run_dir, overrides, done_key)`` in turn, adding its provenance and resolved config to
    ``record``; the runs' metrics, or None (after saying which) when one is not finished."""
    results = []
    for run_dir, overrides, done_key in runs:
        metrics, provenance = train_run(run_dir, overrides, done_key=done_key)
        if not metrics:
            print(f"{run_dir} is not finished: no table written")
            return None
        record.add_run(run_dir.name, run_dir=str(run_dir), **provenance)
        record.add_config(run_dir.name, read_hydra_config(run_dir))
        results.append(metrics)
    return results


def read_hydra_config(run_dir: Path) -> dict:
    """A Hydra run's resolved config (``<run_dir>/.hydra/config.yaml``), ``{}`` when the run left none."""
    from importlib import import_module

    from omegaconf import OmegaConf

    import_module("lit_robust.run.runner")  # registers the configs' resolvers (fast_precision, ...)
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    cfg = OmegaConf.load(path)
    cfg.output_dir = str(run_dir)  # saved as ${hydra:runtime.output_dir}, unresolvable outside the run
    return OmegaConf.to_container(cfg, resolve=True)


def mean_std_max(values: list[float]) -> dict[str, float]:
    """Mean, sample std (0 for one value) and max: PureGen's poisoning tables report mean ± std and max over trials."""
    import statistics
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "max": max(values), "n": len(values)}
