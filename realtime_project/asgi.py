"""The ASGI entry point: HTTP goes to Django, WebSockets to the realtime consumer.

Served by ``manage.py runserver`` (daphne), ``daphne realtime_project.asgi:application``
or ``uvicorn realtime_project.asgi:application``.
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "realtime_project.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_application = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from django.conf import settings  # noqa: E402

from realtime.bodylimit import BodyLimit  # noqa: E402
from realtime.consumer import RealtimeConsumer  # noqa: E402
from realtime.heartbeat import WithHeartbeat  # noqa: E402
from realtime.runtime import lifespan  # noqa: E402

websocket_consumer = RealtimeConsumer.as_asgi()
GC_THRESHOLD_0 = 20_000

# Every process writes its numbers to Redis for the admin's status page from its first connection.
application = WithHeartbeat(ProtocolTypeRouter(
    {
        "http": BodyLimit(django_application, settings.REALTIME_MAX_REST_BODY_BYTES),
        "lifespan": lifespan,  # uvicorn: the runtime's start and close (daphne drains in realtime.server)
        "websocket": URLRouter(
            [
                path("realtime/v1/websocket", websocket_consumer),
                # The reference serves this path behind a gateway that strips /realtime/v1.
                path("socket/websocket", websocket_consumer),
            ]
        ),
    }
))

# Everything loaded so far lives as long as the process. Moving it out of the
# collector's generations keeps full collections from scanning it on the
# fan-out path (they stalled deliveries for 160-200 ms without this).
gc.collect()
gc.freeze()
# Each open socket holds a few hundred objects, all long-lived; at the default thresholds the
# collector's full passes over them took a fifth of the CPU of a burst of joins. Fewer, larger
# young collections keep cyclic garbage bounded at a small fraction of that cost.
gc.set_threshold(GC_THRESHOLD_0, 20, 20)
