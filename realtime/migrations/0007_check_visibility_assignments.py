"""``realtime.check_visibility`` again: settings assigned as plpgsql expressions, not ``PERFORM`` queries (#11).

``VISIBILITY_SQL`` re-creates the function when its body differs and this role owns it.
"""

from django.db import migrations

from realtime.dbsetup import VISIBILITY_SQL


class Migration(migrations.Migration):
    dependencies = [("realtime", "0006_check_visibility")]
    operations = [migrations.RunSQL(VISIBILITY_SQL, reverse_sql=migrations.RunSQL.noop)]
