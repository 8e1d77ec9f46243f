"""SQL that prepares a plain PostgreSQL like a Supabase database for realtime.

Supabase projects already have the ``anon``, ``authenticated`` and
``service_role`` roles; a plain PostgreSQL does not. Creating them (if
missing) and letting the connecting user switch to them (``SET ROLE`` for
authorization checks) is all the server needs. Supabase policies call
``auth.uid()``, ``auth.role()`` and ``auth.jwt()``; where the database has no
such functions, ``AUTH_SQL`` creates them, reading the claims the server sets
for every check, so policies written for Supabase work unchanged. Private
channels are authorized by RLS policies on ``realtime.messages`` that call
``realtime.topic()`` (PROTOCOL.md 7); ``MESSAGES_SQL`` creates both where the
database lacks them and leaves an existing Supabase table as it is.

Run by the ``realtime`` migrations and by the test fixtures (``SETUP_SQL`` is
all of it, in order). Idempotent.
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

AUTH_SQL = """
DO $realtime$
BEGIN
  CREATE SCHEMA IF NOT EXISTS auth;
  GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
  IF to_regprocedure('auth.uid()') IS NULL THEN
    CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $f$
      SELECT coalesce(
        nullif(current_setting('request.jwt.claim.sub', true), ''),
        nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'
      )::uuid
    $f$;
  END IF;
  IF to_regprocedure('auth.role()') IS NULL THEN
    CREATE FUNCTION auth.role() RETURNS text LANGUAGE sql STABLE AS $f$
      SELECT coalesce(
        nullif(current_setting('request.jwt.claim.role', true), ''),
        nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role'
      )::text
    $f$;
  END IF;
  IF to_regprocedure('auth.jwt()') IS NULL THEN
    CREATE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS $f$
      SELECT coalesce(
        nullif(current_setting('request.jwt.claim', true), ''),
        nullif(current_setting('request.jwt.claims', true), '')
      )::jsonb
    $f$;
  END IF;
END
$realtime$;
"""

MESSAGES_SQL = """
DO $realtime$
BEGIN
  CREATE SCHEMA IF NOT EXISTS realtime;
  GRANT USAGE ON SCHEMA realtime TO anon, authenticated, service_role;
  IF to_regclass('realtime.messages') IS NULL THEN
    CREATE TABLE realtime.messages (
      id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
      topic text NOT NULL,
      extension text NOT NULL CHECK (extension IN ('broadcast', 'presence')),
      payload jsonb,
      binary_payload bytea,
      event text,
      private boolean DEFAULT true,
      inserted_at timestamp NOT NULL DEFAULT now(),
      updated_at timestamp NOT NULL DEFAULT now()
    );
    -- Without policies nobody but a BYPASSRLS role may read or write a private topic.
    ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY;
    GRANT SELECT, INSERT, UPDATE ON realtime.messages TO anon, authenticated, service_role;
  END IF;
  IF to_regprocedure('realtime.topic()') IS NULL THEN
    CREATE FUNCTION realtime.topic() RETURNS text LANGUAGE sql STABLE AS $f$
      SELECT nullif(current_setting('realtime.topic', true), '')::text
    $f$;
    GRANT EXECUTE ON FUNCTION realtime.topic() TO anon, authenticated, service_role;
  END IF;
END
$realtime$;
"""

SETUP_SQL = ROLES_SQL + AUTH_SQL + MESSAGES_SQL
