"""Django REST framework glue shared by the REST endpoints: async views and the reference's error bodies.

DRF 3.16's ``APIView.dispatch`` is synchronous: under ASGI Django would run
such a view in its single sync thread and every await (Redis, the channel
layer, a policy check) would hop back to the loop. ``AsyncAPIView`` keeps
DRF's pipeline (request wrapping, authentication, permissions, exception
handler, renderer) but awaits the handler on the event loop; each step before
the handler is CPU only (token verification included).

Errors are ``APIError`` subclasses carrying the reference's status and JSON
body (PROTOCOL.md 5.3); ``exception_handler`` turns them, and DRF's own
authentication and method errors, into those bodies. Every answer carries the
open CORS headers the reference sends.
"""

from __future__ import annotations

import inspect
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from rest_framework import exceptions, status
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.permissions import BasePermission
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from realtime.rest_auth import SupabaseJWTAuthentication

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "authorization, apikey, x-client-info, content-type, x-api-key",
    "Access-Control-Max-Age": "86400",
}


class APIError(exceptions.APIException):
    """An error answered with ``status_code`` and exactly ``body`` as JSON."""

    def __init__(self, status_code: int, body: dict[str, Any]) -> None:
        super().__init__()
        self.status_code = status_code
        self.body = body


def message(status_code: int, text: str) -> APIError:
    """``{"message": text}``, the reference's form for 401, 403, 413 and 429."""
    return APIError(status_code, {"message": text})


class ReferenceJSONRenderer(JSONRenderer):
    """JSON as ``json.dumps`` writes it by default (``{"message": "Unauthorized"}``), as before DRF."""

    compact = False
    ensure_ascii = True


class JSONOnly(BaseContentNegotiation):
    """Always JSON: the reference ignores ``Accept``, so no request is refused with 406."""

    def select_parser(self, request: Request, parsers: list[Any]) -> Any:
        return parsers[0] if parsers else None

    def select_renderer(
        self, request: Request, renderers: list[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        return renderers[0], renderers[0].media_type


class TokenForPost(BasePermission):
    """POST needs a verified token; OPTIONS (CORS preflight) and other methods (405) need none."""

    def has_permission(self, request: Request, view: Any) -> bool:
        return request.method != "POST" or bool(request.user and request.user.is_authenticated)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """The reference's status and body for each error DRF or a view raises; None re-raises (500)."""
    if isinstance(exc, APIError):
        return Response(exc.body, status=exc.status_code)
    if isinstance(exc, (exceptions.NotAuthenticated, exceptions.AuthenticationFailed)):
        headers = {"WWW-Authenticate": exc.auth_header} if getattr(exc, "auth_header", None) else None
        return Response({"message": "Unauthorized"}, status=status.HTTP_401_UNAUTHORIZED, headers=headers)
    if isinstance(exc, exceptions.MethodNotAllowed):
        return Response({"message": "Method not allowed"}, status=status.HTTP_405_METHOD_NOT_ALLOWED)
    if isinstance(exc, exceptions.APIException):
        return Response({"message": str(exc.detail)}, status=exc.status_code)
    return None


class AsyncAPIView(APIView):
    """A DRF view whose handlers are coroutines awaited on the event loop."""

    authentication_classes = [SupabaseJWTAuthentication]
    permission_classes = [TokenForPost]
    renderer_classes = [ReferenceJSONRenderer]
    content_negotiation_class = JSONOnly
    parser_classes: list[Any] = []  # handlers read request.body themselves (JSON or raw bytes)
    throttle_classes: list[Any] = []  # rates are counted in Redis by the handlers (async)

    def get_exception_handler(self) -> Any:
        return exception_handler

    def perform_authentication(self, request: Request) -> None:
        """Lazy: only ``TokenForPost`` asks for ``request.user``, so a preflight's token is never read."""

    async def options(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return Response(status=status.HTTP_204_NO_CONTENT)

    async def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        """``APIView.dispatch`` with the handler awaited; the response leaves rendered (see ``rendered``)."""
        self.args = args
        self.kwargs = kwargs
        drf_request = self.initialize_request(request, *args, **kwargs)
        self.request = drf_request
        self.headers = self.default_response_headers
        try:
            self.initial(drf_request, *args, **kwargs)
            method = (drf_request.method or "").lower()
            handler = getattr(self, method, None) if method in self.http_method_names else None
            if handler is None:
                handler = self.http_method_not_allowed
            response = handler(drf_request, *args, **kwargs)
            if inspect.isawaitable(response):
                response = await response
        except Exception as exc:
            response = self.handle_exception(exc)
        self.response = self.finalize_response(drf_request, response, *args, **kwargs)
        return rendered(self.response)

    def finalize_response(self, request: Request, response: HttpResponseBase, *args: Any, **kwargs: Any) -> HttpResponseBase:
        response = super().finalize_response(request, response, *args, **kwargs)
        for name, value in CORS_HEADERS.items():
            response[name] = value
        return response


def rendered(response: HttpResponseBase) -> HttpResponseBase:
    """A DRF ``Response`` rendered here, as a plain ``HttpResponse``.

    Django's async handler renders a response that has ``render()`` through
    ``sync_to_async``: one more hop to its single sync thread per request,
    for a few microseconds of JSON.
    """
    if not isinstance(response, Response):
        return response
    response.render()
    plain = HttpResponse(response.content, status=response.status_code)
    if "Content-Type" not in response:
        del plain["Content-Type"]
    for name, value in response.items():
        plain[name] = value
    return plain
