"""Run the benchmark modules and print one table per module.

A module joins the suite by being named in MODULES and exposing
`run() -> list[Row]`; a module that prints its own table returns an empty
list. A row is (name, value, unit) or, when the figure has a target,
(name, value, unit, target) for a minimum or (name, value, unit, target,
"max") for a maximum. Missing a target makes the exit status 1 so that a
regression cannot pass unnoticed.

Arguments select modules by substring: `python -m bench ltx`.
"""

from __future__ import annotations

import importlib
import sys

MODULES = (
    "bench.ltx",
    "bench.primary",
    "bench.replication",
    "bench.failover",
    "bench.load",
    "bench.proxy",
)

Row = tuple[str, float, str] | tuple[str, float, str, float] | tuple[str, float, str, float, str]


def print_rows(module: str, rows: list[Row]) -> bool:
    """Print a table; False when any target was missed."""
    met = True
    print(f"== {module}")
    print(f"{'benchmark':<36} {'measured':>16}   target")
    for row in rows:
        name, value, unit = row[0], row[1], row[2]
        target = ""
        verdict = ""
        if len(row) >= 4:
            bound = row[3]
            maximum = len(row) == 5 and row[4] == "max"
            ok = value <= bound if maximum else value >= bound
            target = f"{'<=' if maximum else '>='} {bound:g} {unit}"
            verdict = "ok" if ok else "MISSED"
            met = met and ok
        print(f"{name:<36} {value:>11.2f} {unit:<4}   {target:<16} {verdict}".rstrip())
    return met


def main(argv: list[str]) -> int:
    selected = [m for m in MODULES if not argv or any(a in m for a in argv)]
    if not selected:
        print(f"no benchmark matches {' '.join(argv)}; known: {', '.join(MODULES)}")
        return 2
    met = True
    for name in selected:
        rows = importlib.import_module(name).run()
        if rows:
            met = print_rows(name, rows) and met
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
