from django.db import migrations

from realtime.dbsetup import AUTH_SQL


class Migration(migrations.Migration):
    dependencies = [("realtime", "0001_supabase_roles")]
    operations = [migrations.RunSQL(AUTH_SQL, reverse_sql=migrations.RunSQL.noop)]
