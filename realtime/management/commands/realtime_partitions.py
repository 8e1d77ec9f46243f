"""``manage.py realtime_partitions``: create and drop the daily partitions of ``realtime.messages``, once.

The replicator does this periodically (``shared.partitions.amaintain_partitions``);
the command is for a deployment that schedules it itself, or to catch up by hand.
"""

from __future__ import annotations

from typing import Any

import psycopg
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from shared.partitions import NotPartitioned, maintain_partitions


class Command(BaseCommand):
    help = (
        "Create the daily partitions of realtime.messages from yesterday to 3 days ahead, move rows waiting "
        "in the default partition into them, and drop the data older than 72 hours."
    )
    requires_system_checks: list[str] = []

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            with psycopg.connect(settings.DATABASE_URL, autocommit=True) as conn:
                outcome = maintain_partitions(conn)
        except NotPartitioned as error:
            raise CommandError(str(error)) from None
        except psycopg.OperationalError as error:
            raise CommandError(f"cannot reach the database: {error}") from None
        if outcome.skipped:
            self.stdout.write("another session is maintaining the partitions; nothing done")
            return
        self.stdout.write(
            f"created {', '.join(outcome.created) or 'none'}; dropped {', '.join(outcome.dropped) or 'none'}; "
            f"{outcome.moved} rows moved from and {outcome.purged} expired rows deleted from the default partition"
        )
        if outcome.failed:
            raise CommandError(f"failed, see the log: {', '.join(outcome.failed)}")
