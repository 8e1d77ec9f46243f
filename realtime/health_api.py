"""``GET /api/health`` (readiness, a DRF view) and ``GET /healthcheck`` (liveness, as the reference).

Readiness answers 200 when PostgreSQL, Redis and an active replicator are
all up, 503 otherwise, with each one's state as JSON (``shared.health``).
Neither needs a token: a load balancer or an orchestrator asks them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from rest_framework import status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response

from shared.health import Readiness, check_postgres, check_redis_and_replicator
from realtime.limits import get_redis
from realtime.rest import AsyncAPIView


async def liveness(request: HttpRequest) -> HttpResponse:
    """``ok`` while the process answers HTTP at all."""
    return HttpResponse("ok", content_type="text/plain")


async def readiness() -> Readiness:
    """Ask PostgreSQL and Redis (and, through Redis, the replicator's state) at once."""
    postgres, (redis, replicator) = await asyncio.gather(
        check_postgres(settings.DATABASE_URL),
        check_redis_and_replicator(get_redis(), settings.REALTIME_REDIS_PREFIX, settings.REALTIME_SLOT, time.time()),
    )
    return Readiness(postgres=postgres, redis=redis, replicator=replicator)


class HealthView(AsyncAPIView):
    """Readiness as JSON: 200 when every dependency is up, 503 when one is down."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    async def get(self, request: Request) -> Response:
        result = await readiness()
        code = status.HTTP_200_OK if result.ok else status.HTTP_503_SERVICE_UNAVAILABLE
        return Response(result.body(), status=code, headers={"Cache-Control": "no-store"})
