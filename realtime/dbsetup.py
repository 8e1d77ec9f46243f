"""SQL that prepares a plain PostgreSQL like a Supabase database for realtime.

Supabase projects already have the ``anon``, ``authenticated`` and
``service_role`` roles; a plain PostgreSQL does not. Creating them (if
missing) and letting the connecting user switch to them (``SET ROLE`` for
authorization checks) is all the server needs. Run by the ``realtime``
migration and by the test fixtures. Idempotent.
"""

ROLES_SQL = """
DO $realtime$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
    CREATE ROLE anon NOLOGIN NOINHERIT;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
    CREATE ROLE authenticated NOLOGIN NOINHERIT;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
  END IF;
  BEGIN
    GRANT anon, authenticated, service_role TO CURRENT_USER;
  EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'realtime: cannot grant the API roles to %; grant them so SET ROLE works', CURRENT_USER;
  END;
  GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
END
$realtime$;
"""
