"""What every bench writes beside its text output: the run's machine and commit, and its results as JSON.

``run_meta()`` describes the run (git commit, ``-dirty`` when tracked files differ, cores, CPU model,
UTC date, Python), ``write_json()`` writes one object per step (``type: "step"``) followed by one
summary object (``type: "summary"``) that carries the run's description, so ``bench/compare.py``
can set two runs side by side. ``percentile()`` and ``fmt()`` are the helpers every table uses.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def git_commit(repo: Path = REPO) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def run_meta(bench: str, **extra: Any) -> dict[str, Any]:
    return {"bench": bench, "git_commit": git_commit(), "cores": os.cpu_count(), "cpu_model": cpu_model(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), **extra}


def write_json(path: Path, steps: Iterable[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
    """One ``{"type": "step", ...}`` object per step, then ``{"type": "summary", ...}``."""
    records = [{"type": "step", **step} for step in steps]
    records.append({"type": "summary", **summary})
    path.write_text(json.dumps(records, indent=1, default=str) + "\n")


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..1) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


def pids_named(comm: str) -> list[int]:
    """The pids of the processes whose ``/proc/<pid>/comm`` is ``comm`` (e.g. ``postgres``)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == comm:
                    found.append(int(entry))
    return found


def postgres_pids() -> list[int]:
    return pids_named("postgres")


class FanoutVerdict:
    """The verdict of a fan-out step, mixed into a bench's ``Step`` dataclass (which defines ``rate_ok``).

    It passes with no loss (``missing``: messages some socket did not get, counted per socket, those
    the server closed included), no repeats (``dups``), something received, the sender on rate
    (``rate_ok``; ``rate_short`` names the failure) and p99 within ``p99_limit_ms``.
    """

    missing: int
    dups: int
    received: int
    p99_ms: float | None
    rate_short = "rate short"
    p99_limit_ms = 100.0

    @property
    def loss(self) -> int:
        return self.missing

    @property
    def rate_ok(self) -> bool:
        raise NotImplementedError

    def failures(self) -> list[str]:
        """Why the step fails; empty when it passes."""
        return [label for label, bad in (
            ("loss", self.loss > 0), ("dups", self.dups > 0), ("nothing received", self.received == 0),
            (self.rate_short, not self.rate_ok),
            (f"p99 > {self.p99_limit_ms:g}", self.p99_ms is None or self.p99_ms > self.p99_limit_ms)) if bad]

    @property
    def passed(self) -> bool:
        return not self.failures()


def fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)
