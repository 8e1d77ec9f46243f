"""``realtime.messages`` partitioned by day, ``realtime.send``/``send_binary``/``broadcast_changes`` (#12).

Turns the plain table 0003 made into the partitioned one (rows, grants and
policies kept), adds the database broadcast functions and the publication,
then creates the daily partitions around today.
"""

from typing import Any

from django.db import migrations

from realtime.dbsetup import BROADCAST_SQL, MESSAGES_SQL
from shared.partitions import maintain_partitions


def create_partitions(apps: Any, schema_editor: Any) -> None:
    schema_editor.connection.ensure_connection()
    # The psycopg connection, inside this migration's transaction: each partition gets a savepoint.
    maintain_partitions(schema_editor.connection.connection)


class Migration(migrations.Migration):
    dependencies = [("realtime", "0003_realtime_messages")]
    operations = [
        migrations.RunSQL(MESSAGES_SQL, reverse_sql=migrations.RunSQL.noop),
        migrations.RunSQL(BROADCAST_SQL, reverse_sql=migrations.RunSQL.noop),
        migrations.RunPython(create_partitions, reverse_code=migrations.RunPython.noop),
    ]
