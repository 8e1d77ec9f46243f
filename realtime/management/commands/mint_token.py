"""``manage.py mint_token --role anon``: print a JWT signed with JWT_SECRET.

Gives a development setup its anon and service_role keys for supabase-js.
"""

from __future__ import annotations

import json
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from core.jwt import mint_token


class Command(BaseCommand):
    help = "Print an HS256 JWT for ROLE signed with JWT_SECRET (anon and service_role keys for clients)."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--role", default="anon", help="Postgres role claim (anon, authenticated, service_role).")
        parser.add_argument("--expires-in", type=int, default=10 * 365 * 24 * 3600, help="Lifetime in seconds.")
        parser.add_argument("--sub", help="Subject (user id) claim.")
        parser.add_argument("--claims", default="{}", help="Extra claims as a JSON object.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            extra = json.loads(options["claims"])
        except ValueError as error:
            raise CommandError(f"--claims is not JSON: {error}") from None
        if not isinstance(extra, dict):
            raise CommandError("--claims must be a JSON object")
        if options["sub"]:
            extra["sub"] = options["sub"]
        token = mint_token(settings.JWT_SECRET, options["role"], time.time(), options["expires_in"], **extra)
        self.stdout.write(token)
