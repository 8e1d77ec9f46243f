"""``python -m devservices start|stop|status``: the embedded services from a shell.

Only the standard library is imported until the command runs. Run by an
interpreter without redis-py (a bare ``python3``), the command re-executes
itself with the checkout's ``.venv`` Python, which ``dev.py`` populates.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

USAGE = "usage: python -m devservices start|stop|status"


def _venv_python() -> Path | None:
    """The checkout's .venv Python when this interpreter lacks redis-py and is not it."""
    if importlib.util.find_spec("redis") is not None:
        return None
    python = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python"
    if not python.exists() or Path(sys.prefix).resolve() == python.parent.parent.resolve():
        return None
    return python


def main(argv: Sequence[str] | None = None, prog: str = "devservices") -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] not in {"start", "stop", "status"}:
        print(USAGE.replace("devservices", prog), file=sys.stderr)
        return 2
    python = _venv_python()
    if python is not None:
        os.execv(python, [str(python), "-m", "devservices", *args])
    from devservices import postgres, redis, services

    try:
        if args[0] == "start":
            print(f"DATABASE_URL={postgres.ensure_postgres()}")
            print(f"REDIS_URL={redis.ensure_redis()}")
        elif args[0] == "stop":
            services.stop_services()
            print("embedded PostgreSQL and Redis stopped")
        else:
            for name, state in services.status().items():
                print(f"{name}: {state}")
    except services.EmbeddedServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
