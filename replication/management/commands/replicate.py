"""``manage.py replicate``: stream database changes to the channel layer until stopped.

Thin: reads options and settings, hands the work to ``replication.listener``.
The first SIGTERM or Ctrl-C stops it cleanly; a second one exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from channels.layers import get_channel_layer
from redis.asyncio import Redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from shared import metrics
from shared.claimsets import Directory
from replication.broadcast_listener import BroadcastListener, messages_slot
from replication.listener import Listener
from replication.status import StatusReporter

logger = logging.getLogger("replication")


class Command(BaseCommand):
    help = "Read PostgreSQL logical replication (pgoutput) and publish changes to realtime subscribers."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--slot", default=settings.REALTIME_SLOT, help="Logical replication slot name.")
        parser.add_argument("--publication", default=settings.REALTIME_PUBLICATION, help="Publication name.")
        parser.add_argument(
            "--read", choices=("stream", "peek"), default=settings.REALTIME_REPLICATION_READ,
            help="stream: START_REPLICATION on a replication connection (default); peek: poll the SQL interface"
            " (for a database reachable only through a pooler that refuses replication connections).",
        )
        parser.add_argument("--poll-interval", type=float, default=0.01, help="Seconds between polls when idle (peek).")
        parser.add_argument("--batch", type=int, default=2000, help="Changes read per page (whole transactions when peeking).")
        parser.add_argument(
            "--messages-slot", default=None,
            help="Slot streaming realtime.messages (broadcast from the database); default: <slot>_messages.",
        )
        parser.add_argument(
            "--no-broadcasts", action="store_true", help="Do not stream realtime.messages (another process does)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        layer = get_channel_layer()
        if layer is None:
            raise CommandError("CHANNEL_LAYERS is not configured")
        listener = Listener(
            settings.DATABASE_URL,
            options["slot"],
            options["publication"],
            layer,
            batch_changes=options["batch"],
            poll_interval=options["poll_interval"],
            streaming=options["read"] == "stream",
            check_connections=settings.REALTIME_CHECK_CONNECTIONS,
        )
        broadcasts = None
        if not options["no_broadcasts"]:
            broadcasts = BroadcastListener(
                settings.DATABASE_URL,
                options["messages_slot"] or messages_slot(options["slot"]),
                layer,
                max_payload_bytes=settings.REALTIME_MAX_PAYLOAD_SIZE_KB * 1000 + 500,
                poll_interval=options["poll_interval"],
                max_per_second=settings.REALTIME_MAX_DB_BROADCASTS_PER_SECOND,
                streaming=options["read"] == "stream",
            )
        port = settings.REALTIME_REPLICATOR_METRICS_PORT
        if port:
            from prometheus_client import start_http_server

            try:
                start_http_server(port, addr=settings.REALTIME_REPLICATOR_METRICS_ADDRESS, registry=metrics.REPLICATOR)
            except OSError as error:
                raise CommandError(f"cannot serve metrics on port {port}: {error.strerror}") from None
            logger.info("metrics on http://%s:%d/metrics", settings.REALTIME_REPLICATOR_METRICS_ADDRESS, port)
        asyncio.run(self._run(listener, broadcasts))

    async def _run(self, listener: Listener, broadcasts: BroadcastListener | None) -> None:
        redis = Redis.from_url(settings.REDIS_URL, socket_connect_timeout=5, socket_timeout=15)
        listener.directory = Directory(redis, settings.REALTIME_REDIS_PREFIX)
        reporter = StatusReporter(listener, settings.DATABASE_URL, redis, settings.REALTIME_REDIS_PREFIX)
        try:
            await self._serve(listener, broadcasts, reporter)
        finally:
            await redis.aclose()

    async def _serve(self, listener: Listener, broadcasts: BroadcastListener | None, reporter: StatusReporter) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def request_stop() -> None:
            if stop.is_set():
                raise SystemExit(1)
            logger.info("stopping: finishing the current batch")
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, request_stop)
        try:
            # Both slots in one process, each advanced only after its own publishing.
            await asyncio.gather(
                listener.run(stop), reporter.run(stop), *([broadcasts.run(stop)] if broadcasts is not None else [])
            )
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        stats = listener.stats
        logger.info(
            "stopped after %d changes; %d row level security queries for %d runs (%d claim-set checks)",
            stats.changes, stats.rls_queries, stats.rls_runs, stats.rls_checks,
        )
