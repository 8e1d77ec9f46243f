"""Moved: the development services are the top-level ``devservices`` package (``python -m devservices``).

This stub keeps ``python -m realtime_project.embedded start|stop|status``
working for those who type it; nothing imports it, and it imports
``devservices`` only when run as that command.
"""

if __name__ == "__main__":
    import sys

    from devservices.cli import main

    sys.exit(main(prog="realtime_project.embedded"))
