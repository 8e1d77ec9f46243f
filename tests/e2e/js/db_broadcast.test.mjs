import { test, before } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import WebSocket from 'ws'
import { ANON_KEY, SERVICE_KEY, SUPABASE_URL, Scenario, WAIT_MS, bytesOf, mintToken, sleep, sql, uniqueTopic } from './helpers.mjs'

// Broadcast from the database (PROTOCOL.md 5.4) and replay at join (5.5).
await sql('--roles')

function quote(text) {
  return `'${text.replaceAll("'", "''")}'`
}

/** Let `role` read the private broadcasts of `topic` for this test only. */
async function readPolicy(t, topic, role = 'authenticated') {
  const name = `test_${randomUUID().replaceAll('-', '').slice(0, 12)}`
  await sql(`CREATE POLICY "${name}" ON realtime.messages FOR SELECT TO ${role} USING (realtime.topic() = ${quote(topic)})`)
  t.after(() => sql(`DROP POLICY IF EXISTS "${name}" ON realtime.messages`))
}

function member(s, name = 'member') {
  return s.client(name, { key: mintToken({ role: 'authenticated', sub: randomUUID() }) })
}

function send(topic, payload, event = 'e', isPrivate = true) {
  return sql(`SELECT realtime.send(${quote(JSON.stringify(payload))}::jsonb, ${quote(event)}, ${quote(topic)}, ${isPrivate})`)
}

async function refusal(s, channel) {
  const watch = s.watchStatuses(channel)
  const failure = await watch.next(({ status }) => status !== 'SUBSCRIBED', WAIT_MS, 'the join to fail')
  assert.equal(failure.status, 'CHANNEL_ERROR', s.error(JSON.stringify(failure)).message)
  return failure.message
}

// The session replicator streams realtime.messages on a second slot that starts beside the
// first one: wait until a send reaches a subscriber before the tests rely on it.
before(async () => {
  const s = new Scenario({ after: () => {} })
  try {
    const topic = uniqueTopic('warmup')
    const channel = s.client('service_role', { key: SERVICE_KEY }).channel(topic, { config: { private: true } })
    const inbox = s.inbox(channel)
    await s.subscribe(channel)
    const deadline = Date.now() + 30_000
    while (inbox.items.length === 0 && Date.now() < deadline) {
      await send(topic, { warm: true })
      await sleep(300)
    }
    assert.ok(inbox.items.length > 0, s.error('database broadcasts never arrived').message)
  } finally {
    await s.close()
  }
})

test('broadcast_changes in a trigger reaches an authenticated private subscriber on insert, update and delete', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic('todos')
  const table = `bc_${randomUUID().replaceAll('-', '').slice(0, 10)}`
  await readPolicy(t, topic)
  await sql(
    `CREATE TABLE public.${table} (id int PRIMARY KEY, title text)`,
    `CREATE FUNCTION public.${table}_notify() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
     BEGIN
       PERFORM realtime.broadcast_changes(${quote(topic)}, TG_OP, TG_OP, TG_TABLE_NAME, TG_TABLE_SCHEMA, NEW, OLD);
       RETURN NULL;
     END $$`,
    `CREATE TRIGGER notify AFTER INSERT OR UPDATE OR DELETE ON public.${table} FOR EACH ROW EXECUTE FUNCTION public.${table}_notify()`
  )
  t.after(() => sql(`DROP TABLE IF EXISTS public.${table}`, `DROP FUNCTION IF EXISTS public.${table}_notify()`))
  const channel = member(s).channel(topic, { config: { private: true } })
  const inbox = s.inbox(channel)
  await s.subscribe(channel)

  await sql(`INSERT INTO public.${table} VALUES (1, 'a')`, `UPDATE public.${table} SET title = 'b'`, `DELETE FROM public.${table}`)
  const inserted = await inbox.waitForEvent('INSERT')
  const updated = await inbox.waitForEvent('UPDATE')
  const deleted = await inbox.waitForEvent('DELETE')
  assert.deepEqual(inserted.payload.record, { id: 1, title: 'a' })
  assert.equal(inserted.payload.old_record, null)
  assert.equal(inserted.payload.operation, 'INSERT')
  assert.equal(inserted.payload.table, table)
  assert.equal(inserted.payload.schema, 'public')
  assert.deepEqual(updated.payload.old_record, { id: 1, title: 'a' })
  assert.deepEqual(updated.payload.record, { id: 1, title: 'b' })
  assert.deepEqual(deleted.payload.old_record, { id: 1, title: 'b' })
  for (const message of [inserted, updated, deleted]) {
    assert.match(message.meta.id, /^[0-9a-f-]{36}$/)
    assert.equal(message.payload.id, message.meta.id)
  }
})

test('realtime.send reaches private and public subscribers with meta.id, send_binary as bytes', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic('send')
  await readPolicy(t, topic)
  const privateChannel = member(s).channel(topic, { config: { private: true } })
  const publicChannel = s.client('anon').channel(topic)
  const privateInbox = s.inbox(privateChannel)
  const publicInbox = s.inbox(publicChannel)
  await s.subscribe(privateChannel)
  await s.subscribe(publicChannel)

  await send(topic, { text: 'for members' }, 'private-event', true)
  await send(topic, { text: 'for everyone', id: 'mine' }, 'public-event', false)
  await sql(`SELECT realtime.send_binary('\\x00ff7f'::bytea, 'bytes', ${quote(topic)}, true)`)

  const mine = await privateInbox.waitForEvent('private-event')
  assert.equal(mine.payload.text, 'for members')
  assert.equal(mine.payload.id, mine.meta.id)
  const theirs = await publicInbox.waitForEvent('public-event')
  assert.deepEqual(theirs.payload, { text: 'for everyone', id: 'mine' })
  assert.match(theirs.meta.id, /^[0-9a-f-]{36}$/)
  const binary = await privateInbox.waitForEvent('bytes')
  assert.deepEqual(bytesOf(binary.payload), [0, 255, 127])
  assert.match(binary.meta.id, /^[0-9a-f-]{36}$/)
  await sleep(300)
  assert.equal(publicInbox.count((m) => m.event !== 'public-event'), 0, 'private rows never reach public channels')
  assert.equal(privateInbox.count((m) => m.event === 'public-event'), 0, 'public rows never reach private channels')
})

test('a failing send leaves the caller\'s transaction committed', async (t) => {
  const table = `bf_${randomUUID().replaceAll('-', '').slice(0, 10)}`
  await sql(`CREATE TABLE public.${table} (id int PRIMARY KEY)`)
  t.after(() => sql(`DROP TABLE IF EXISTS public.${table}`))
  // topic NULL violates realtime.messages' NOT NULL: send turns it into a WARNING.
  await sql(`DO $$ BEGIN INSERT INTO public.${table} VALUES (1); PERFORM realtime.send('{}'::jsonb, 'e', NULL); END $$`)
  const rows = await sql(`SELECT count(*)::int AS n FROM public.${table}`)
  assert.equal(rows[0].n, 1)
})

test('replay at join sends JSON and binary rows oldest first with meta.replayed, then live ones', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic('replay')
  await readPolicy(t, topic)
  const since = Date.now() - 60_000
  await send(topic, { n: 1 }, 'first')
  await sql(`SELECT realtime.send_binary('\\x0102'::bytea, 'second', ${quote(topic)})`)
  await send(topic, { n: 3 }, 'third')
  await send(topic, { n: 4 }, 'public', false)
  const stored = await sql(
    `SELECT id::text AS id, event FROM realtime.messages WHERE topic = ${quote(topic)} AND private ORDER BY inserted_at`
  )
  assert.equal(stored.length, 3)

  const channel = member(s).channel(topic, { config: { private: true, broadcast: { replay: { since, limit: 2 } } } })
  const inbox = s.inbox(channel)
  await s.subscribe(channel)
  await inbox.waitFor(() => inbox.items.length >= 2, WAIT_MS, 'two replayed rows')
  const [binary, json] = inbox.items
  assert.equal(binary.event, 'second')
  assert.deepEqual(bytesOf(binary.payload), [1, 2])
  assert.deepEqual(binary.meta, { replayed: true, id: stored[1].id })
  assert.equal(json.event, 'third')
  assert.equal(json.payload.n, 3)
  assert.deepEqual(json.meta, { replayed: true, id: stored[2].id })

  await send(topic, { n: 5 }, 'live')
  const live = await inbox.waitForEvent('live')
  assert.equal(live.meta.replayed, undefined)
  await sleep(300)
  assert.deepEqual(inbox.items.map((m) => m.event), ['second', 'third', 'live'])
})

test('replay errors are worded as the reference words them', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic('replay-errors')
  await readPolicy(t, topic)

  const invalid = member(s, 'invalid').channel(topic, { config: { private: true, broadcast: { replay: { since: 'yesterday' } } } })
  assert.equal(await refusal(s, invalid), 'UnableToReplayMessages: Replay params are not valid')

  // 10^20 ms is past PostgreSQL's timestamps: the replay query fails.
  const failing = member(s, 'failing').channel(topic, { config: { private: true, broadcast: { replay: { since: 1e20 } } } })
  assert.equal(await refusal(s, failing), 'UnableToReplayMessages: Realtime was unable to replay messages')

  // realtime-js refuses to send replay on a public channel itself; a raw client can.
  const url = `${SUPABASE_URL.replace(/^http/, 'ws')}/realtime/v1/websocket?apikey=${ANON_KEY}&vsn=2.0.0`
  const socket = new WebSocket(url)
  t.after(() => socket.terminate())
  await new Promise((resolve, reject) => {
    socket.once('open', resolve)
    socket.once('error', reject)
  })
  const reply = new Promise((resolve) => {
    socket.on('message', (data) => {
      const frame = JSON.parse(data.toString())
      if (frame[3] === 'phx_reply' && frame[1] === '1') resolve(frame[4])
    })
  })
  const config = { broadcast: { replay: { since: 0 } }, private: false }
  socket.send(JSON.stringify(['1', '1', `realtime:${topic}`, 'phx_join', { config }]))
  assert.deepEqual(await s.within(reply, WAIT_MS, 'the join reply'), {
    status: 'error',
    response: { reason: 'UnableToReplayMessages: Replay is not allowed for public channels' },
  })
})
