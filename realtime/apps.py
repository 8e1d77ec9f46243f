"""App config: registers the realtime system checks and fixes the process's malloc settings."""

from django.apps import AppConfig


class RealtimeConfig(AppConfig):
    name = "realtime"
    verbose_name = "Realtime"

    def ready(self) -> None:
        from realtime import checks  # noqa: F401  (registers the checks)
        from realtime.logs import redact_access_logs

        redact_access_logs()  # no token of a connect URL in uvicorn's access log
        from realtime.memory import fix_mmap_threshold

        fix_mmap_threshold()
        from shared import metrics

        if metrics.MULTIPROCESS_DIR:
            import atexit

            atexit.register(metrics.process_exited)  # this process's live gauges leave the sums
