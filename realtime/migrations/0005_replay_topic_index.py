"""The replay index on ``realtime.messages (topic, inserted_at DESC)`` for databases migrated before it.

``MESSAGES_SQL`` is idempotent: on a database that has everything else it only creates the index.
"""

from django.db import migrations

from realtime.dbsetup import MESSAGES_SQL


class Migration(migrations.Migration):
    dependencies = [("realtime", "0004_partitioned_messages")]
    operations = [migrations.RunSQL(MESSAGES_SQL, reverse_sql=migrations.RunSQL.noop)]
