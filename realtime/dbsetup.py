"""SQL that prepares a plain PostgreSQL like a Supabase database for realtime.

Supabase projects already have the ``anon``, ``authenticated`` and
``service_role`` roles; a plain PostgreSQL does not. Creating them (if
missing) and letting the connecting user switch to them (``SET ROLE`` for
authorization checks) is all the server needs. Supabase policies call
``auth.uid()``, ``auth.role()`` and ``auth.jwt()``; where the database has no
such functions, ``AUTH_SQL`` creates them, reading the claims the server sets
for every check, so policies written for Supabase work unchanged.

Private channels are authorized by RLS policies on ``realtime.messages`` that
call ``realtime.topic()`` (PROTOCOL.md 7), and the database broadcasts by
inserting into that table (PROTOCOL.md 5.4). ``MESSAGES_SQL`` gives it the
reference's shape: partitioned by range of ``inserted_at``, with a DEFAULT
partition so that a row always has somewhere to go (``shared.partitions``
adds the daily ones), and the publication the replicator streams it from. It
turns the plain table earlier versions made into that shape, keeping its rows,
grants, row level security flags and policies; a partitioned table (such as
Supabase's) is left as it is but for what it lacks. ``BROADCAST_SQL`` creates
``realtime.send``, ``realtime.send_binary`` and ``realtime.broadcast_changes``
as the reference defines them, and re-creates them when this file changes
them, unless someone else owns them.

Row level security of postgres_changes is checked by
``realtime.check_visibility`` (``VISIBILITY_SQL``): one call checks a run of
changes for every subscribed claim set, inside PostgreSQL, as
``shared.visibility`` describes. Only the owner may execute it.

Run by the ``realtime`` migrations and by the test fixtures (``SETUP_SQL`` is
all of it, in order). Idempotent; concurrent runs wait for each other.
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
DECLARE
  plain regclass;
  statement text;
BEGIN
  -- Test fixtures of parallel runs prepare the same database.
  PERFORM pg_advisory_xact_lock(hashtextextended('realtime.dbsetup', 0));
  CREATE SCHEMA IF NOT EXISTS realtime;
  GRANT USAGE ON SCHEMA realtime TO anon, authenticated, service_role;

  -- The plain table of earlier versions is set aside and emptied into the new one below.
  IF (SELECT relkind FROM pg_class WHERE oid = to_regclass('realtime.messages')) = 'r' THEN
    ALTER TABLE realtime.messages RENAME TO messages_unpartitioned;
    plain := 'realtime.messages_unpartitioned'::regclass;
  END IF;

  IF to_regclass('realtime.messages') IS NULL THEN
    CREATE TABLE realtime.messages (
      topic text NOT NULL,
      extension text NOT NULL,
      payload jsonb,
      event text,
      private boolean DEFAULT false,
      updated_at timestamp NOT NULL DEFAULT now(),
      inserted_at timestamp NOT NULL DEFAULT now(),
      id uuid NOT NULL DEFAULT gen_random_uuid(),
      binary_payload bytea
    ) PARTITION BY RANGE (inserted_at);
    -- Without policies nobody but a BYPASSRLS role may read or write a private topic.
    ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY;
    GRANT SELECT, INSERT, UPDATE ON realtime.messages TO anon, authenticated, service_role;
  END IF;

  -- Rows of a day without its partition (maintenance late, or the rows just
  -- moved from the plain table) wait here; realtime.partitions moves them.
  IF (SELECT partdefid FROM pg_partitioned_table WHERE partrelid = 'realtime.messages'::regclass) = 0 THEN
    CREATE TABLE realtime.messages_default PARTITION OF realtime.messages DEFAULT;
  END IF;

  IF plain IS NOT NULL THEN
    INSERT INTO realtime.messages (topic, extension, payload, event, private, updated_at, inserted_at, id, binary_payload)
      SELECT topic, extension, payload, event, private, updated_at, inserted_at, id, binary_payload
      FROM realtime.messages_unpartitioned;
    FOR statement IN
      SELECT format(
        'GRANT %s ON realtime.messages TO %s%s',
        a.privilege_type,
        CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
        CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END
      )
      FROM pg_class c, aclexplode(c.relacl) a
      WHERE c.oid = plain AND a.grantee <> c.relowner
    LOOP
      EXECUTE statement;
    END LOOP;
    -- Policies are re-created from the catalog: names and roles quoted, expressions as PostgreSQL prints them.
    FOR statement IN
      SELECT format(
        'CREATE POLICY %I ON realtime.messages AS %s FOR %s TO %s%s%s',
        p.polname,
        CASE WHEN p.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
        CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE' WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
        (SELECT string_agg(CASE WHEN r = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r)) END, ', ')
         FROM unnest(p.polroles) AS r),
        coalesce(' USING (' || pg_get_expr(p.polqual, p.polrelid) || ')', ''),
        coalesce(' WITH CHECK (' || pg_get_expr(p.polwithcheck, p.polrelid) || ')', '')
      )
      FROM pg_policy p
      WHERE p.polrelid = plain
      ORDER BY p.polname
    LOOP
      EXECUTE statement;
    END LOOP;
    IF NOT (SELECT relrowsecurity FROM pg_class WHERE oid = plain) THEN
      ALTER TABLE realtime.messages DISABLE ROW LEVEL SECURITY;
    END IF;
    IF (SELECT relforcerowsecurity FROM pg_class WHERE oid = plain) THEN
      ALTER TABLE realtime.messages FORCE ROW LEVEL SECURITY;
    END IF;
    -- Fails, and so undoes all of this, if a view or another table depends on it.
    DROP TABLE realtime.messages_unpartitioned;
  END IF;

  -- What an older Supabase table may lack. Each ALTER only when needed: it
  -- requires owning the table, which on Supabase the migrating user may not.
  IF NOT EXISTS (SELECT 1 FROM pg_attribute
                 WHERE attrelid = 'realtime.messages'::regclass AND attname = 'binary_payload' AND NOT attisdropped) THEN
    ALTER TABLE realtime.messages ADD COLUMN binary_payload bytea;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'realtime.messages'::regclass AND contype = 'p') THEN
    ALTER TABLE realtime.messages ADD CONSTRAINT messages_pkey PRIMARY KEY (id, inserted_at);
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_constraint
                 WHERE conrelid = 'realtime.messages'::regclass AND conname = 'messages_payload_exclusive') THEN
    ALTER TABLE realtime.messages
      ADD CONSTRAINT messages_payload_exclusive CHECK (payload IS NULL OR binary_payload IS NULL);
  END IF;
  -- Private broadcasts by time (the reference's index).
  IF to_regclass('realtime.messages_inserted_at_topic_index') IS NULL THEN
    CREATE INDEX messages_inserted_at_topic_index ON realtime.messages (inserted_at DESC, topic)
      WHERE extension = 'broadcast' AND private IS TRUE;
  END IF;
  -- Replay reads one private topic's newest broadcasts (PROTOCOL.md 5.5): straight to the topic,
  -- however many other topics' rows were inserted since ``since``.
  IF to_regclass('realtime.messages_topic_inserted_at_index') IS NULL THEN
    CREATE INDEX messages_topic_inserted_at_index ON realtime.messages (topic, inserted_at DESC)
      WHERE extension = 'broadcast' AND private IS TRUE;
  END IF;

  IF to_regprocedure('realtime.topic()') IS NULL THEN
    CREATE FUNCTION realtime.topic() RETURNS text LANGUAGE sql STABLE AS $f$
      SELECT nullif(current_setting('realtime.topic', true), '')::text
    $f$;
    GRANT EXECUTE ON FUNCTION realtime.topic() TO anon, authenticated, service_role;
  END IF;

  -- The replicator streams inserted rows from here (PROTOCOL.md 5.4); through
  -- the root, so that every partition's rows arrive as realtime.messages.
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'supabase_realtime_messages_publication') THEN
    CREATE PUBLICATION supabase_realtime_messages_publication FOR TABLE realtime.messages
      WITH (publish = 'insert', publish_via_partition_root = true);
  ELSIF NOT EXISTS (
    SELECT 1 FROM pg_publication p
    WHERE p.pubname = 'supabase_realtime_messages_publication'
      AND (p.puballtables OR EXISTS (SELECT 1 FROM pg_publication_rel r
                                     WHERE r.prpubid = p.oid AND r.prrelid = 'realtime.messages'::regclass))
  ) THEN
    -- Dropping the plain table took it out of the publication.
    ALTER PUBLICATION supabase_realtime_messages_publication ADD TABLE realtime.messages;
  END IF;
END
$realtime$;
"""

BROADCAST_SQL = """
DO $realtime$
DECLARE
  -- The bodies, as the reference has them (PROTOCOL.md 5.4) but for
  -- set_config in place of SET LOCAL: the same setting, without dynamic SQL.
  send_body text := $body$
DECLARE
  generated_id uuid;
  final_payload jsonb;
BEGIN
  BEGIN
    generated_id := gen_random_uuid();
    IF payload ? 'id' THEN
      final_payload := payload;
    ELSE
      final_payload := jsonb_set(payload, '{id}', to_jsonb(generated_id));
    END IF;
    PERFORM set_config('realtime.topic', topic, true);
    INSERT INTO realtime.messages (id, payload, event, topic, private, extension)
    VALUES (generated_id, final_payload, event, topic, private, 'broadcast');
  EXCEPTION
    WHEN OTHERS THEN
      RAISE WARNING 'WarnSendingBroadcastMessage: %', SQLERRM;
  END;
END;
$body$;
  send_binary_body text := $body$
DECLARE
  generated_id uuid;
BEGIN
  BEGIN
    generated_id := gen_random_uuid();
    PERFORM set_config('realtime.topic', topic, true);
    INSERT INTO realtime.messages (id, binary_payload, event, topic, private, extension)
    VALUES (generated_id, payload, event, topic, private, 'broadcast');
  EXCEPTION
    WHEN OTHERS THEN
      RAISE WARNING 'WarnSendingBroadcastMessage: %', SQLERRM;
  END;
END;
$body$;
  broadcast_changes_body text := $body$
DECLARE
  row_data jsonb := '{}'::jsonb;
BEGIN
  IF level = 'STATEMENT' THEN
    RAISE EXCEPTION 'function can only be triggered for each row, not for each statement';
  END IF;
  IF operation = 'INSERT' OR operation = 'UPDATE' OR operation = 'DELETE' THEN
    row_data := jsonb_build_object('old_record', OLD, 'record', NEW, 'operation', operation, 'table', table_name, 'schema', table_schema);
    PERFORM realtime.send(row_data, event_name, topic_name);
  ELSE
    RAISE EXCEPTION 'Unexpected operation type: %', operation;
  END IF;
EXCEPTION
  WHEN OTHERS THEN
    RAISE EXCEPTION 'Failed to process the row: %', SQLERRM;
END;
$body$;
  me oid := (SELECT oid FROM pg_roles WHERE rolname = current_user);
BEGIN
  PERFORM pg_advisory_xact_lock(hashtextextended('realtime.dbsetup', 0));
  -- Each function: created if missing, re-created if its body differs and we own it.
  IF coalesce((SELECT prosrc <> send_body AND proowner = me FROM pg_proc
               WHERE oid = to_regprocedure('realtime.send(jsonb, text, text, boolean)')), true) THEN
    EXECUTE 'CREATE OR REPLACE FUNCTION realtime.send(payload jsonb, event text, topic text, private boolean DEFAULT true)'
      ' RETURNS void LANGUAGE plpgsql AS ' || quote_literal(send_body);
    GRANT EXECUTE ON FUNCTION realtime.send(jsonb, text, text, boolean) TO anon, authenticated, service_role;
  END IF;
  IF coalesce((SELECT prosrc <> send_binary_body AND proowner = me FROM pg_proc
               WHERE oid = to_regprocedure('realtime.send_binary(bytea, text, text, boolean)')), true) THEN
    EXECUTE 'CREATE OR REPLACE FUNCTION realtime.send_binary(payload bytea, event text, topic text, private boolean DEFAULT true)'
      ' RETURNS void LANGUAGE plpgsql AS ' || quote_literal(send_binary_body);
    GRANT EXECUTE ON FUNCTION realtime.send_binary(bytea, text, text, boolean) TO anon, authenticated, service_role;
  END IF;
  IF coalesce((SELECT prosrc <> broadcast_changes_body AND proowner = me FROM pg_proc
               WHERE oid = to_regprocedure('realtime.broadcast_changes(text, text, text, text, text, record, record, text)')), true) THEN
    EXECUTE 'CREATE OR REPLACE FUNCTION realtime.broadcast_changes(topic_name text, event_name text, operation text,'
      ' table_name text, table_schema text, new record, old record, level text DEFAULT ''ROW'')'
      ' RETURNS void LANGUAGE plpgsql AS ' || quote_literal(broadcast_changes_body);
    GRANT EXECUTE ON FUNCTION realtime.broadcast_changes(text, text, text, text, text, record, record, text)
      TO anon, authenticated, service_role;
  END IF;
END
$realtime$;
"""

VISIBILITY_SQL = """
DO $realtime$
DECLARE
  -- One call per run of changes, for every claim set (realtime.visibility):
  -- per claim set, in a block of its own that is always rolled back, become
  -- its role with its claims and run the caller's prepared lookup (``lookup``
  -- names it; ``keys`` is its argument, as text its parameter type reads). Returns a row per claim set that sees
  -- something (claim_set, visible = ordinals of the keys it sees), per claim
  -- set whose check failed (claim_set, error, sqlstate), and, when the
  -- statement timeout fired during a claim set other than the first, one row
  -- (claim_set, NULL, NULL, NULL): that claim set and the ones after it were
  -- not checked, and the caller asks again from there with a fresh timeout.
  body text := $body$
DECLARE
  statement text := format('EXECUTE %I(%L)', lookup, keys);
  found integer[];
  message text;
  code text;
  done text;
BEGIN
  -- The lookup's plan is made once per role, not once per claim set.
  done := set_config('plan_cache_mode', 'force_generic_plan', true);
  FOR i IN 1 .. coalesce(array_length(roles, 1), 0) LOOP
    found := NULL;
    BEGIN
      -- Assignments, not PERFORM: plpgsql evaluates a lone function call without
      -- running a query through the executor (a quarter of a claim set's fixed cost).
      done := set_config('role', roles[i], true);
      done := set_config('request.jwt.claims', claims[i], true);
      done := set_config('request.jwt.claim.sub', subs[i], true);
      done := set_config('request.jwt.claim.role', roles[i], true);
      EXECUTE statement INTO found;
      -- Undo whatever the policies did (settings, writes), as a rolled-back transaction would.
      RAISE SQLSTATE 'RLSOK';
    EXCEPTION
      WHEN SQLSTATE 'RLSOK' THEN
        NULL;
      WHEN query_canceled THEN
        -- The statement timeout fires once per call. The first claim set had all of
        -- it: its check took too long. Any other is asked again, first, in a new call.
        IF i = 1 THEN
          GET STACKED DIAGNOSTICS message = MESSAGE_TEXT, code = RETURNED_SQLSTATE;
          RETURN QUERY SELECT i, NULL::integer[], message, code;
          i := i + 1;
        END IF;
        IF i <= array_length(roles, 1) THEN
          RETURN QUERY SELECT i, NULL::integer[], NULL::text, NULL::text;
        END IF;
        RETURN;
      WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS message = MESSAGE_TEXT, code = RETURNED_SQLSTATE;
        RETURN QUERY SELECT i, NULL::integer[], message, code;
        CONTINUE;
    END;
    IF found IS NOT NULL THEN
      RETURN QUERY SELECT i, found, NULL::text, NULL::text;
    END IF;
  END LOOP;
END;
$body$;
  signature text := 'realtime.check_visibility(text, text, text[], text[], text[])';
  me oid := (SELECT oid FROM pg_roles WHERE rolname = current_user);
BEGIN
  PERFORM pg_advisory_xact_lock(hashtextextended('realtime.dbsetup', 0));
  CREATE SCHEMA IF NOT EXISTS realtime;
  IF coalesce((SELECT prosrc <> body AND proowner = me FROM pg_proc WHERE oid = to_regprocedure(signature)), true) THEN
    EXECUTE 'CREATE OR REPLACE FUNCTION realtime.check_visibility(lookup text, keys text, roles text[],'
      ' claims text[], subs text[]) RETURNS TABLE (claim_set integer, visible integer[], error text, sqlstate text)'
      ' LANGUAGE plpgsql VOLATILE AS ' || quote_literal(body);
    -- It switches to any role the session user may become: never for API clients.
    EXECUTE 'REVOKE ALL ON FUNCTION ' || signature || ' FROM PUBLIC';
  END IF;
END
$realtime$;
"""

SETUP_SQL = ROLES_SQL + AUTH_SQL + MESSAGES_SQL + BROADCAST_SQL + VISIBILITY_SQL
