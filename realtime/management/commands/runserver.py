"""``manage.py runserver``: daphne's runserver with the realtime protocol overrides.

See ``realtime.server`` for what the overrides do and why (the graceful stop on
SIGTERM among them). ``--workers N`` runs N server processes on the port under
one supervising parent (``realtime.supervisor``); ``--reuse-port`` listens with
``SO_REUSEPORT`` so that several processes can share the port.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any

from daphne.management.commands.runserver import Command as DaphneRunserver
from django.core.management.base import CommandError, CommandParser

from realtime.server import RealtimeServer
from realtime.supervisor import Supervisor, child_command


class Command(DaphneRunserver):
    server_cls = RealtimeServer

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument(
            "--workers", type=int, default=0,
            help="Run this many server processes on the port (SO_REUSEPORT), restarted if they die.",
        )
        parser.add_argument(
            "--reuse-port", action="store_true",
            help="Listen with SO_REUSEPORT, so that several server processes can share the port.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        workers = options["workers"]
        if workers:
            if workers < 1:
                raise CommandError("--workers needs a number of processes, 1 or more")
            sys.exit(Supervisor(child_command(sys.argv), workers).run())
        super().handle(*args, **options)

    def inner_run(self, *args: Any, **options: Any) -> None:
        if options.get("reuse_port"):
            self.server_cls = partial(RealtimeServer, reuse_port=(self.addr, int(self.port)))  # type: ignore[assignment]  # called like the class
        super().inner_run(*args, **options)
