"""I/O pieces both the server processes (``realtime``) and the replicator (``replication``) use.

The claim-set registry in Redis (``claimsets``), the row visibility checks
(``visibility``), the partitions of ``realtime.messages`` (``partitions``) and
the database helpers they share (``database``). Imports only ``core`` of the
project, so neither edge imports the other to reach them.
"""
