from django.db import migrations

from realtime.dbsetup import MESSAGES_SQL


class Migration(migrations.Migration):
    dependencies = [("realtime", "0002_auth_functions")]
    operations = [migrations.RunSQL(MESSAGES_SQL, reverse_sql=migrations.RunSQL.noop)]
