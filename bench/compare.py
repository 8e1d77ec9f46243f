#!/usr/bin/env python3
"""Set two runs of one bench side by side from the JSON files the benches write.

    .venv/bin/python bench/compare.py OLD.json NEW.json

Prints the two runs' commits and machines, then every numeric summary field and every numeric field
of the steps found in both runs (a step is matched on its identifying fields: server, path, scenario,
n, subs, users, sockets, rate), with NEW/OLD as a ratio. Fields present in one run only are listed
with a dash for the other.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

IDENTITY = ("server", "path", "scenario", "kind", "n", "subs", "sockets", "users", "rate")
RUN_FIELDS = ("bench", "git_commit", "date", "cores", "cpu_model", "python")


def load(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    records = json.loads(path.read_text())
    steps = [r for r in records if r.get("type") == "step"]
    summaries = [r for r in records if r.get("type") == "summary"]
    return steps, (summaries[-1] if summaries else {})


def flat(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(flat(value, f"{name}."))
    return out


def identity(step: dict[str, Any]) -> tuple[Any, ...]:
    return tuple((k, step[k]) for k in IDENTITY if k in step)


def rows(old: dict[str, float], new: dict[str, float]) -> list[str]:
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        ratio = f"{b / a:8.2f}x" if a and b is not None else "        -"
        lines.append(f"  {key:<40} {'-' if a is None else f'{a:g}':>14} {'-' if b is None else f'{b:g}':>14} {ratio}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    (old_steps, old_sum), (new_steps, new_sum) = (load(Path(p)) for p in argv)
    for field in RUN_FIELDS:
        print(f"{field:<12} {old_sum.get(field, '-')!s:<44} {new_sum.get(field, '-')!s}")
    print(f"\nsummary{'':<36} {'old':>14} {'new':>14} {'new/old':>9}")
    print("\n".join(rows(flat({k: v for k, v in old_sum.items() if k not in RUN_FIELDS}),
                        flat({k: v for k, v in new_sum.items() if k not in RUN_FIELDS}))))
    new_by_id = {identity(s): s for s in new_steps}
    for step in old_steps:
        key = identity(step)
        match = new_by_id.get(key)
        if match is None:
            continue
        label = " ".join(f"{k}={v}" for k, v in key) or "step"
        print(f"\n{label}")
        ident = set(IDENTITY)
        print("\n".join(rows({k: v for k, v in flat(step).items() if k not in ident},
                             {k: v for k, v in flat(match).items() if k not in ident})))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
