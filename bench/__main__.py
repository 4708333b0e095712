"""Run every benchmark module and write ``bench/results.json``.

Each ``bench/bench_<topic>.py`` defines ``run(report: Report) -> None`` and adds rows with
``report.add(section, name, **values)``. ``python -m bench [topic ...]`` runs a subset.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).with_name("results.json")


class Report:
    def __init__(self) -> None:
        self.sections: dict[str, list[dict]] = {}
        self.notes: list[str] = []

    def add(self, section: str, name: str, **values: object) -> None:
        self.sections.setdefault(section, []).append({"name": name, **values})

    def note(self, line: str) -> None:
        """A headline result, printed after the tables."""
        self.notes.append(line)

    def render(self, console: Console) -> None:
        for section, rows in self.sections.items():
            table = Table(title=section)
            columns = list(dict.fromkeys(k for row in rows for k in row))
            for col in columns:
                table.add_column(col, justify="left" if col == "name" else "right")
            for row in rows:
                table.add_row(*(_fmt(row.get(c, "")) for c in columns))
            console.print(table)
        for line in self.notes:
            console.print(line)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    topics = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(here)])
                    if m.name.startswith("bench_"))
    chosen = argv or topics
    unknown = sorted(set(chosen) - set(topics))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {topics}", file=sys.stderr)
        return 2
    console, report = Console(), Report()
    for topic in chosen:
        start = time.perf_counter()
        console.print(f"[bold]bench {topic}[/bold]")
        importlib.import_module(f"bench.bench_{topic}").run(report)
        console.print(f"  done in {time.perf_counter() - start:.1f} s")
    report.render(console)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() and argv else {}
    previous.update(report.sections)
    RESULTS.write_text(json.dumps(previous, indent=2, default=str))
    console.print(f"results written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
