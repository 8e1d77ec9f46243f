"""Run SQL for the Node end-to-end files, which have no PostgreSQL driver.

    python tests/e2e/sql.py [--roles] STATEMENT [STATEMENT ...]

``--roles`` first prepares the database as ``manage.py migrate`` does
(``realtime.dbsetup.SETUP_SQL``: API roles, ``auth`` functions, ``realtime.messages``). Each statement runs in its own transaction (autocommit) against ``PG_URL``
(else ``DATABASE_URL``); the rows of the last statement that returns any are
printed as one JSON array of objects on stdout. An error exits with status 1
and the database's message on stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row


def run(statements: list[str], dsn: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        for statement in statements:
            cursor = conn.execute(statement.encode())
            if cursor.description is not None:
                rows = cursor.fetchall()
    return rows


def main(argv: list[str]) -> int:
    if argv[:1] == ["--roles"]:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from realtime.dbsetup import SETUP_SQL

        argv = [SETUP_SQL, *argv[1:]]
    dsn = os.environ.get("PG_URL") or os.environ.get("DATABASE_URL")
    if not dsn:
        print("PG_URL (or DATABASE_URL) is required", file=sys.stderr)
        return 2
    try:
        rows = run(argv, dsn)
    except psycopg.Error as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    json.dump(rows, sys.stdout, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
