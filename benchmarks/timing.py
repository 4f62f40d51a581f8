"""Interleaved timing for every benchmark: the cases of one comparison take turns (A B A B …), so a load that comes
and goes on a shared machine hits them alike, and each ratio is printed with the load and thread count it ran under.

    cases = {"bare loop": lambda: bare(...), "callback": lambda: callback(...)}
    timings = interleaved(cases, repeats=3, warmup=1)
    print_table(timings, reference="bare loop", work=1000, unit="images")

A case returns nothing or the seconds it wants counted (to exclude its own set-up); the device is synchronised by
the case itself. The minimum over repeats is the least disturbed measurement; the median is printed beside it.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable



@dataclass
class Timing:
    """The wall and CPU seconds of each repeat of one case, and the 1-minute load average after each."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.wall)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    def as_dict(self) -> dict:
        return {"wall_min": self.best, "wall_median": self.median, "cpu_min": min(self.cpu),
                "load_max": max(self.load), "wall": self.wall, "cpu": self.cpu}


def machine() -> dict:
    """What a ratio depends on: the record's machine (``records.machine``) and the cores this process may use."""
    from records import machine as recorded_machine
    from lit_robust.machine import cores_available

    return {**recorded_machine(), "cores_available": cores_available()}


def interleaved(cases: dict[str, Callable[[], float | None]], repeats: int = 3, warmup: int = 1
                ) -> dict[str, Timing]:
    """Run every case ``warmup`` times (untimed), then ``repeats`` rounds in which each case runs once, in turn."""
    for _ in range(warmup):
        for run in cases.values():
            run()
    timings = {name: Timing() for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            wall, cpu = time.perf_counter(), time.process_time()
            counted = run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            timings[name].wall.append(wall if counted is None else counted)
            timings[name].cpu.append(cpu)
            timings[name].load.append(os.getloadavg()[0])
    return timings


def print_table(timings: dict[str, Timing], reference: str, work: float = 1.0, unit: str = "runs") -> dict:
    """Print throughput (``work`` per best wall second) and the ratio of each case's throughput to ``reference``'s
    (> 1: faster than the reference); returns the numbers with :func:`machine` for a JSON record."""
    about = machine()
    print(f"cores {about['cores_available']}, torch threads {about['torch_threads']}, OMP_NUM_THREADS "
          f"{about['OMP_NUM_THREADS']}, load {about['load_average'][0]}, torch {about['torch']}")
    base = timings[reference].best
    rows = {}
    for name, timing in timings.items():
        ratio = base / timing.best
        rows[name] = {**timing.as_dict(), "throughput": work / timing.best, "ratio_to_reference": ratio}
        print(f"  {name:<40s} {work / timing.best:10.2f} {unit}/s  min {timing.best:7.3f} s  median "
              f"{timing.median:7.3f} s  cpu {min(timing.cpu):7.3f} s  load ≤ {max(timing.load):4.1f}  "
              f"× {ratio:5.2f} vs {reference}")
    return {"machine": about, "reference": reference, "unit": unit, "work": work, "cases": rows}


RATIO_COLUMNS = [("round", "{round}"), ("case", "{case}"), ("reference (s, min)", "{reference_s:.2f}"),
                 ("case (s, min)", "{case_s:.2f}"), ("case / reference time", "**{time_ratio:.3f}**"),
                 ("vs round 1", "{vs_first:+.1%}"), ("load ≤", "{load:.1f}")]


def ratio_rows(rounds: list[dict[str, Timing]], reference: str) -> list[dict]:
    """One row per round and case: its best time over the reference's, and how far that ratio moved from round 1
    (issue 34: a benchmark run twice back to back should agree within 5 %)."""
    rows, first = [], {}
    for number, timings in enumerate(rounds, start=1):
        for name, timing in timings.items():
            if name == reference:
                continue
            ratio = timing.best / timings[reference].best
            first.setdefault(name, ratio)
            rows.append({"round": number, "case": name, "reference_s": timings[reference].best,
                         "case_s": timing.best, "time_ratio": ratio, "vs_first": ratio / first[name] - 1,
                         "load": max(max(timing.load), max(timings[reference].load))})
    return rows


def write_ratio_record(record, out, rounds: list[dict[str, Timing]], reference: str, settings: dict) -> None:
    """The rounds' ratios into ``record`` (a ``records.TableRecord`` made when the benchmark started), written to
    ``out`` for docs/results.md."""
    record.add_config("benchmark", settings)
    record.add_run("timings", **{f"round {k}": {name: t.as_dict() for name, t in timings.items()}
                                 for k, timings in enumerate(rounds, start=1)})
    print(f"record: {record.write(out, RATIO_COLUMNS, ratio_rows(rounds, reference))}")
