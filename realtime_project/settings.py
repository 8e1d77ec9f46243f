"""Django settings, read once from the environment through ``env.py``.

The operator sets ``DATABASE_URL``, ``REDIS_URL`` and ``JWT_SECRET``; every
other variable has a safe default: ``DJANGO_DEBUG`` is off unless set, and
without ``DJANGO_SECRET_KEY`` the secret key is derived from ``JWT_SECRET``.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from realtime_project.env import database_from_url, env_bool, env_int, env_json_object, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DJANGO_DEBUG", False)
JWT_SECRET = env_str("JWT_SECRET")
# Without DJANGO_SECRET_KEY the key is derived from JWT_SECRET, which is
# already a secret the operator must keep; set it to rotate them separately.
SECRET_KEY = env_str(
    "DJANGO_SECRET_KEY",
    hmac.new(JWT_SECRET.encode(), b"django-secret-key", hashlib.sha256).hexdigest(),
)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    # realtime first: its runserver (daphne with our protocol tweaks) wins.
    "realtime",
    "daphne",
    "realtime_project.apps.RealtimeAdminConfig",  # django.contrib.admin with Presence on its index
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "servestatic",  # its system checks
    "channels",
    "presence",
    "replication",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files (the admin's CSS and scripts) under daphne and uvicorn alike: async, so it
    # answers on the event loop before the other middleware runs.
    "servestatic.middleware.ServeStaticMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "realtime_project.urls"
ASGI_APPLICATION = "realtime_project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL", "postgresql://postgres@127.0.0.1:54329/realtime")
DATABASES = {"default": database_from_url(DATABASE_URL)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:63799/0")
# Prefix of every Redis key the server writes (channel layer, RLS claim-set registry).
REALTIME_REDIS_PREFIX = env_str("REALTIME_LAYER_PREFIX", "realtime")
CHANNEL_LAYERS = {
    "default": {
        # channels_redis' layer, counting the messages it drops for full inboxes (realtime/layer.py).
        "BACKEND": "realtime.layer.RealtimeChannelLayer",
        "CONFIG": {
            # channels_redis blocks 5 s per receive (BZPOPMIN); redis-py's own
            # 5 s read timeout would fire first and fail every idle receive.
            # redis-py's pool raises once 100 connections are busy; a burst of
            # publishes from many sockets needs more.
            "hosts": [
                {
                    "address": REDIS_URL,
                    "socket_timeout": 15,
                    "socket_connect_timeout": 5,
                    "max_connections": env_int("REALTIME_REDIS_MAX_CONNECTIONS", 500),
                }
            ],
            # One hub inbox per process receives every topic's fan-out, so it
            # needs room for bursts; the layer drops (and we count) beyond it.
            "capacity": env_int("REALTIME_LAYER_CAPACITY", 10_000),
            "expiry": 60,
            # A killed process stays in its groups until this long after its
            # last refresh (the hub refreshes every third of it), so group_send
            # stops filling its inbox within this time.
            "group_expiry": env_int("REALTIME_GROUP_EXPIRY_S", 40),
            "prefix": REALTIME_REDIS_PREFIX,
        },
    }
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
# `manage.py collectstatic` copies every app's static files here (README, production).
STATIC_ROOT = Path(env_str("DJANGO_STATIC_ROOT", str(BASE_DIR / "staticfiles")))
# ServeStatic serves STATIC_ROOT once collectstatic has made it; until then (development, tests)
# it serves the apps' own static directories, so the admin has its CSS either way.
SERVESTATIC_USE_FINDERS = not STATIC_ROOT.is_dir()

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("DJANGO_BEHIND_TLS_PROXY", False) else None

# "text" (one line per event) or "json" (one JSON object per line, python-json-logger; a socket's lines
# carry its socket_id as a field).
REALTIME_LOG_FORMAT = env_str("REALTIME_LOG_FORMAT", "text")
if REALTIME_LOG_FORMAT not in ("text", "json"):
    raise ImproperlyConfigured(f"REALTIME_LOG_FORMAT must be text or json, not {REALTIME_LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json" if REALTIME_LOG_FORMAT == "json" else "plain"}},
    "root": {"handlers": ["console"], "level": env_str("REALTIME_LOG_LEVEL", "INFO")},
    "loggers": {"daphne": {"level": "WARNING"}, "django.channels.server": {"level": "WARNING"}},
}

# --- Realtime --------------------------------------------------------------
# The publication whose tables postgres_changes may subscribe to, and the
# replicator's logical slot.
REALTIME_PUBLICATION = env_str("REALTIME_PUBLICATION", "supabase_realtime")
REALTIME_SLOT = env_str("REALTIME_SLOT", "realtime_django")
# How long the hub trusts what a role may read of a table before asking again (REVOKE takes effect
# within this time plus one run of changes).
REALTIME_PRIVILEGES_TTL_MS = env_int("REALTIME_PRIVILEGES_TTL_MS", 1000)
# How often joined channels re-read the publication's tables (PROTOCOL.md 3.5).
REALTIME_PUBLICATION_CHECK_S = env_int("REALTIME_PUBLICATION_CHECK_S", 60)
# statement_timeout (ms) of every check run as a subscriber (join checks, row level security per
# run of changes): a policy that runs longer denies that subscriber, who gets a system error.
REALTIME_CHECK_TIMEOUT_MS = env_int("REALTIME_CHECK_TIMEOUT_MS", 5000)
REALTIME_CHECK_CONNECTIONS = env_int("REALTIME_CHECK_CONNECTIONS", 2)
# A postgres_changes subscription that failed for want of the database or Redis is retried after
# this many milliseconds to twice that (the reference: 5-10 s).
REALTIME_SUBSCRIBE_RETRY_MS = env_int("REALTIME_SUBSCRIBE_RETRY_MS", 5000)
# JSON object of claims every token must carry, e.g. {"iss": "supabase"}.
REALTIME_JWT_CLAIM_VALIDATORS = env_json_object("JWT_CLAIM_VALIDATORS")
# JWKS ({"keys": [...]}) for RS/PS/ES/EdDSA tokens and kid-named HMAC keys; empty: JWT_SECRET only.
REALTIME_JWT_JWKS = env_str("JWT_JWKS", "")
REALTIME_CONNECT_ERROR_BACKOFF_MS = env_int("REALTIME_CONNECT_ERROR_BACKOFF_MS", 2000)
REALTIME_CHANNEL_ERROR_BACKOFF_MS = env_int("REALTIME_CHANNEL_ERROR_BACKOFF_MS", 5000)
# Refuse public channels (PROTOCOL.md 3.2 PrivateOnly).
REALTIME_PRIVATE_ONLY = env_bool("REALTIME_PRIVATE_ONLY", False)
REALTIME_MAX_CHANNELS_PER_CLIENT = env_int("REALTIME_MAX_CHANNELS_PER_CLIENT", 100)
REALTIME_MAX_PAYLOAD_SIZE_KB = env_int("REALTIME_MAX_PAYLOAD_SIZE_KB", 3000)
REALTIME_MAX_FRAME_BYTES = env_int("REALTIME_MAX_FRAME_BYTES", 5_000_000)
REALTIME_IDLE_TIMEOUT_S = env_int("REALTIME_IDLE_TIMEOUT_S", 60)
# Members of a server process that died are removed (and their leaves sent)
# within this many seconds.
REALTIME_PRESENCE_TTL_S = env_int("REALTIME_PRESENCE_TTL_S", 15)
# Presence pushes allowed per channel within the window (the 6th closes it).
REALTIME_PRESENCE_MAX_CALLS = env_int("REALTIME_PRESENCE_MAX_CALLS", 5)
REALTIME_PRESENCE_WINDOW_MS = env_int("REALTIME_PRESENCE_WINDOW_MS", 30_000)
# Connections the kernel queues for the server to accept (daphne via manage.py runserver).
REALTIME_LISTEN_BACKLOG = env_int("REALTIME_LISTEN_BACKLOG", 2048)
# Graceful stop (SIGTERM): a server process closes its sockets (1012) in batches spread over this
# many seconds, so they reconnect to the other processes a few at a time (realtime.runtime).
REALTIME_DRAIN_S = env_int("REALTIME_DRAIN_S", 5)

# --- Operations (README "Metrics, health and logs") ---
# GET /metrics asks for "Authorization: Bearer <this>" when set (empty: open to whoever reaches it).
REALTIME_METRICS_TOKEN = env_str("REALTIME_METRICS_TOKEN", "")
# manage.py replicate serves its metrics on this port (0: not at all), on this address.
REALTIME_REPLICATOR_METRICS_PORT = env_int("REALTIME_REPLICATOR_METRICS_PORT", 0)
REALTIME_REPLICATOR_METRICS_ADDRESS = env_str("REALTIME_REPLICATOR_METRICS_ADDRESS", "0.0.0.0")
# prometheus-client's multiprocess mode (README, Metrics): it reads the variable itself; a missing
# directory would fail at the first metric with a bare FileNotFoundError, so say it here.
PROMETHEUS_MULTIPROC_DIR = env_str("PROMETHEUS_MULTIPROC_DIR", "")
if PROMETHEUS_MULTIPROC_DIR and not Path(PROMETHEUS_MULTIPROC_DIR).is_dir():
    raise ImproperlyConfigured(f"PROMETHEUS_MULTIPROC_DIR names no directory: {PROMETHEUS_MULTIPROC_DIR!r}; create it (empty) first.")

# --- Limits (README "Limits"): each protects the other clients from one client.
# Unsent bytes a socket may leave before the server closes it (1008); it holds at most this plus one frame.
REALTIME_MAX_UNSENT_BYTES = env_int("REALTIME_MAX_UNSENT_BYTES", 4 * 1024 * 1024)
# Sockets across every server process sharing REDIS_URL (0: no limit).
REALTIME_MAX_CONCURRENT_USERS = env_int("REALTIME_MAX_CONCURRENT_USERS", 10_000)
# Sockets per client address in each process (0: no limit). Set it where the server sees real client
# addresses (exposed directly, or behind a proxy whose forwarded address the server trusts).
REALTIME_MAX_SOCKETS_PER_ADDRESS = env_int("REALTIME_MAX_SOCKETS_PER_ADDRESS", 0)
# Inbound frames and bytes per socket, checked before decoding (bursts of 5 s allowed; 0: no limit).
REALTIME_MAX_FRAMES_PER_SECOND = env_int("REALTIME_MAX_FRAMES_PER_SECOND", 200)
REALTIME_MAX_BYTES_PER_SECOND = env_int("REALTIME_MAX_BYTES_PER_SECOND", 1_000_000)
# Per socket, averaged over REALTIME_RATE_WINDOW_S (0: no limit).
REALTIME_MAX_JOINS_PER_SECOND = env_int("REALTIME_MAX_JOINS_PER_SECOND", 50)
REALTIME_MAX_EVENTS_PER_SECOND = env_int("REALTIME_MAX_EVENTS_PER_SECOND", 100)
REALTIME_MAX_PRESENCE_EVENTS_PER_SECOND = env_int("REALTIME_MAX_PRESENCE_EVENTS_PER_SECOND", 20)
REALTIME_RATE_WINDOW_S = env_int("REALTIME_RATE_WINDOW_S", 5)
# Database broadcasts (realtime.send, broadcast_changes) the replicator publishes per second, all topics
# together; beyond it they wait in the slot, none is dropped (0: no limit).
REALTIME_MAX_DB_BROADCASTS_PER_SECOND = env_int("REALTIME_MAX_DB_BROADCASTS_PER_SECOND", 0)
# How the replicator reads its slots: "stream" (the replication protocol) or "peek" (the SQL interface).
REALTIME_REPLICATION_READ = env_str("REALTIME_REPLICATION_READ", "stream")
if REALTIME_REPLICATION_READ not in ("stream", "peek"):
    raise ImproperlyConfigured(f"REALTIME_REPLICATION_READ must be stream or peek, not {REALTIME_REPLICATION_READ!r}")
# postgres_changes bindings per join, and pushes held per channel while its policies are checked.
REALTIME_MAX_BINDINGS_PER_CHANNEL = env_int("REALTIME_MAX_BINDINGS_PER_CHANNEL", 50)
# RE2 instructions of one socket's match/imatch filters, all channels together: what one change
# may cost it per byte of value, at worst (one pattern may have 2,500).
REALTIME_MAX_REGEX_COST_PER_SOCKET = env_int("REALTIME_MAX_REGEX_COST_PER_SOCKET", 2500)
REALTIME_MAX_HELD_PUSHES = env_int("REALTIME_MAX_HELD_PUSHES", 100)
# Database checks (policies, bindings) one socket may have running at once; the rest wait their turn.
REALTIME_MAX_CHECKS_PER_SOCKET = env_int("REALTIME_MAX_CHECKS_PER_SOCKET", 1)
# REST broadcast: messages per request, and request body size.
REALTIME_MAX_BROADCAST_BATCH = env_int("REALTIME_MAX_BROADCAST_BATCH", 100)
REALTIME_MAX_REST_BODY_BYTES = env_int("REALTIME_MAX_REST_BODY_BYTES", 10 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = REALTIME_MAX_REST_BODY_BYTES
# Opaque project keys (sb_publishable_..., sb_secret_...) accepted at connect.
REALTIME_PUBLISHABLE_KEYS = env_list("REALTIME_PUBLISHABLE_KEYS", [])
REALTIME_SECRET_KEYS = env_list("REALTIME_SECRET_KEYS", [])
# The REST endpoints authenticate with simplejwt's classes around core.jwt's verification
# (JWT_SECRET, JWT_JWKS, JWT_CLAIM_VALIDATORS; realtime/rest_auth.py says why). simplejwt's own
# TokenBackend is unused; its key is set to JWT_SECRET so that it never falls back to SECRET_KEY.
SIMPLE_JWT = {
    "AUTH_TOKEN_CLASSES": ("realtime.rest_auth.SupabaseAccessToken",),
    "SIGNING_KEY": JWT_SECRET,
    "USER_ID_CLAIM": "sub",
    "TOKEN_TYPE_CLAIM": None,
    "JTI_CLAIM": None,
}

DAPHNE_WEBSOCKET_MAX_MESSAGE_SIZE = REALTIME_MAX_FRAME_BYTES
DAPHNE_WEBSOCKET_MAX_FRAME_SIZE = REALTIME_MAX_FRAME_BYTES
