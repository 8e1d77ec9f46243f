"""App config: registers the realtime system checks."""

from django.apps import AppConfig


class RealtimeConfig(AppConfig):
    name = "realtime"
    verbose_name = "Realtime"

    def ready(self) -> None:
        from realtime import checks  # noqa: F401  (registers the checks)
