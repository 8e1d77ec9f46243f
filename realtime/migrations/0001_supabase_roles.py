from django.db import migrations

from realtime.dbsetup import ROLES_SQL


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []
    operations = [migrations.RunSQL(ROLES_SQL, reverse_sql=migrations.RunSQL.noop)]
