"""``realtime.check_visibility``: row level security of a run of changes for every claim set in one call (#11)."""

from django.db import migrations

from realtime.dbsetup import VISIBILITY_SQL


class Migration(migrations.Migration):
    dependencies = [("realtime", "0005_replay_topic_index")]
    operations = [migrations.RunSQL(VISIBILITY_SQL, reverse_sql=migrations.RunSQL.noop)]
