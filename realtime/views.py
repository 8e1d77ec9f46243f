"""Small HTTP views that are not part of the Supabase API: liveness and Prometheus metrics."""

import asyncio
import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from shared import metrics


async def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness probe for load balancers and the test fixtures."""
    return JsonResponse({"status": "ok"})


def metrics_authorized(header: str, token: str) -> bool:
    """Whether an ``Authorization`` header carries the metrics bearer token (any header when there is none)."""
    if not token:
        return True
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


async def prometheus_metrics(request: HttpRequest) -> HttpResponse:
    """``GET /metrics``: every server process's metrics in the Prometheus text format (``shared.metrics``)."""
    if request.method not in ("GET", "HEAD"):
        return HttpResponse(status=405, headers={"Allow": "GET, HEAD"})
    if not metrics_authorized(request.headers.get("Authorization", ""), settings.REALTIME_METRICS_TOKEN):
        return HttpResponse("Unauthorized\n", status=401, content_type="text/plain", headers={"WWW-Authenticate": "Bearer"})
    # Multiprocess mode reads one file per process: off the event loop.
    body = await asyncio.to_thread(metrics.render) if metrics.MULTIPROCESS_DIR else metrics.render()
    return HttpResponse(body, content_type=metrics.CONTENT_TYPE)
