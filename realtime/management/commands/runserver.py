"""``manage.py runserver``: daphne's runserver with the realtime protocol overrides.

See ``realtime.server`` for what the overrides do and why.
"""

from daphne.management.commands.runserver import Command as DaphneRunserver

from realtime.server import RealtimeServer


class Command(DaphneRunserver):
    server_cls = RealtimeServer
