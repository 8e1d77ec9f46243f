"""Small HTTP views that are not part of the Supabase API."""

from django.http import HttpRequest, JsonResponse


async def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness probe for load balancers and the test fixtures."""
    return JsonResponse({"status": "ok"})
