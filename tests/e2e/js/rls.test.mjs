import { before, test } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { QUIET_MS, SERVICE_KEY, Scenario, WAIT_MS, mintToken, sleep, sql, uniqueTopic } from './helpers.mjs'
import { changes, createTable, subscribeChanges } from './changes.mjs'

// Row level security on postgres_changes (PROTOCOL.md 4.4, C45-C47): users A and
// B under the Supabase-style policy `user_id = auth.uid()`.

const USER_A = randomUUID()
const USER_B = randomUUID()
const NOTE_COLUMNS = 'id bigint PRIMARY KEY, user_id uuid, body text'

before(async () => {
  await sql('--roles')
})

/** A published notes table with RLS on and the owner policy for `authenticated`. */
async function notesTable(t, { identity = null } = {}) {
  const table = await createTable(t, NOTE_COLUMNS, { identity })
  await sql(
    `ALTER TABLE public.${table} ENABLE ROW LEVEL SECURITY`,
    // A token with "fail": "yes" makes the policy raise on every row (body is not a number).
    `CREATE POLICY owner ON public.${table} FOR SELECT TO authenticated USING (
       CASE WHEN auth.jwt() ->> 'fail' = 'yes' THEN body::int > 0 ELSE user_id = auth.uid() END)`
  )
  return table
}

/** A client signed in as `claims` (or the anon key), subscribed to every change of `table`. */
async function subscriber(s, name, table, claims = null, options = {}) {
  const client = claims
    ? s.client(name, { accessToken: async () => mintToken(claims), ...options })
    : s.client(name, options)
  if (claims) await client.realtime.setAuth()
  const channel = client.channel(uniqueTopic('rls'))
  const box = changes(s, channel, { event: '*', schema: 'public', table })
  await subscribeChanges(s, channel)
  return box
}

const ids = (box) => box.items.map((p) => (p.eventType === 'DELETE' ? p.old.id : p.new.id))

test('A receives only A rows, B only B rows, anon nothing, service_role everything', async (t) => {
  const s = new Scenario(t)
  const table = await notesTable(t)
  const a = await subscriber(s, 'a', table, { role: 'authenticated', sub: USER_A })
  const b = await subscriber(s, 'b', table, { role: 'authenticated', sub: USER_B })
  const anon = await subscriber(s, 'anon', table)
  const service = await subscriber(s, 'service', table, null, { key: SERVICE_KEY })

  await sql(
    `INSERT INTO public.${table} VALUES (1, '${USER_A}', 'a1'), (2, '${USER_B}', 'b2'), (3, '${USER_A}', 'a3')`,
    `INSERT INTO public.${table} VALUES (4, NULL, 'nobody')`
  )
  await service.waitFor((p) => p.new.id === 4, WAIT_MS, 'the last row at service_role')
  await a.waitFor((p) => p.new.id === 3, WAIT_MS, "A's second row")
  await b.waitFor((p) => p.new.id === 2, WAIT_MS, "B's row")
  await sleep(QUIET_MS)

  assert.deepEqual(ids(a), [1, 3], s.error('A saw rows of others').message)
  assert.deepEqual(ids(b), [2], s.error('B saw rows of others').message)
  assert.deepEqual(ids(anon), [], s.error('anon has no policy and must see nothing').message)
  assert.deepEqual(ids(service), [1, 2, 3, 4])
  assert.equal(a.items[0].new.body, 'a1')
})

test('an UPDATE that moves a row from A to B reaches B and not A', async (t) => {
  const s = new Scenario(t)
  const table = await notesTable(t)
  const a = await subscriber(s, 'a', table, { role: 'authenticated', sub: USER_A })
  const b = await subscriber(s, 'b', table, { role: 'authenticated', sub: USER_B })

  await sql(`INSERT INTO public.${table} VALUES (1, '${USER_A}', 'mine')`)
  await a.waitFor((p) => p.eventType === 'INSERT', WAIT_MS, "A's INSERT")
  await sql(`UPDATE public.${table} SET user_id = '${USER_B}', body = 'yours' WHERE id = 1`)
  const moved = await b.waitFor((p) => p.eventType === 'UPDATE', WAIT_MS, "B's UPDATE")
  assert.equal(moved.new.body, 'yours')
  await sleep(QUIET_MS)

  assert.deepEqual(a.items.map((p) => p.eventType), ['INSERT'], s.error('A got the row after it left A').message)
  assert.deepEqual(b.items.map((p) => p.eventType), ['UPDATE'])
})

test('a subscriber whose policy raises gets nothing and does not hold up the others', async (t) => {
  const s = new Scenario(t)
  const table = await notesTable(t)
  const broken = await subscriber(s, 'broken', table, { role: 'authenticated', sub: USER_A, fail: 'yes' })
  const a = await subscriber(s, 'a', table, { role: 'authenticated', sub: USER_A })

  for (let n = 1; n <= 3; n++) {
    await sql(`INSERT INTO public.${table} VALUES (${n}, '${USER_A}', 'not a number')`)
  }
  await a.waitFor((p) => p.new.id === 3, WAIT_MS, 'the third row')
  await sleep(QUIET_MS)
  assert.deepEqual(ids(a), [1, 2, 3])
  assert.deepEqual(ids(broken), [], s.error('the raising policy let rows through').message)
})

test('a DELETE on an RLS table with FULL identity carries only the primary key', async (t) => {
  // C45
  const s = new Scenario(t)
  const table = await notesTable(t, { identity: 'FULL' })
  await sql(`INSERT INTO public.${table} VALUES (7, '${USER_B}', 'private words')`)
  const a = await subscriber(s, 'a', table, { role: 'authenticated', sub: USER_A })

  await sql(`DELETE FROM public.${table} WHERE id = 7`)
  const gone = await a.waitFor((p) => p.eventType === 'DELETE', WAIT_MS, 'the DELETE')
  assert.deepEqual(gone.old, { id: 7 })
  assert.deepEqual(gone.new, {})
})

test('a column revoked from the role is missing from new and from columns', async (t) => {
  // C47
  const s = new Scenario(t)
  const table = await notesTable(t)
  await sql(
    `REVOKE SELECT ON public.${table} FROM authenticated`,
    `GRANT SELECT (id, user_id) ON public.${table} TO authenticated`
  )
  const client = s.client('a', { accessToken: async () => mintToken({ role: 'authenticated', sub: USER_A }) })
  await client.realtime.setAuth()
  const channel = client.channel(uniqueTopic('rls'))
  const box = changes(s, channel, { event: 'INSERT', schema: 'public', table })
  await subscribeChanges(s, channel)

  await sql(`INSERT INTO public.${table} VALUES (1, '${USER_A}', 'hidden')`)
  const got = await box.waitFor(() => true, WAIT_MS, 'the INSERT')
  assert.deepEqual(got.new, { id: 1, user_id: USER_A })

  await sleep(QUIET_MS)
  const frames = s
    .framesContaining(client, '"postgres_changes"')
    .map((buffer) => JSON.parse(buffer.toString('utf8')))
    .filter((frame) => Array.isArray(frame) && frame[3] === 'postgres_changes')
  assert.equal(frames.length, 1)
  assert.deepEqual(frames[0][4].data.columns.map((c) => c.name), ['id', 'user_id'])
})
