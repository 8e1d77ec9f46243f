"""PostgreSQL's types, pure (no I/O): shared by the replicator and the postgres_changes filters.

``catalog`` is the one table of built-in types both sides know; ``values``
turns the text PostgreSQL prints into the JSON values a change carries;
``casting`` reads a filter's text the way PostgreSQL's input functions would,
and the typed values of a record as comparison keys.
"""
