import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { QUIET_MS, SERVICE_KEY, SUPABASE_URL, Scenario, WAIT_MS, mintToken, sleep, sql, uniqueTopic } from './helpers.mjs'

// Private channels are authorized by RLS policies on realtime.messages (PROTOCOL.md 7).
await sql('--roles')

const BATCH_URL = `${SUPABASE_URL}/realtime/v1/api/broadcast`
/** How long a send with ack waits before realtime-js resolves 'timed out'. */
const ACK_TIMEOUT_MS = 1_500

function quote(text) {
  return `'${text.replaceAll("'", "''")}'`
}

/** Create a policy on realtime.messages for this test only (`body` follows `ON realtime.messages`). */
async function policy(t, body) {
  const name = `test_${randomUUID().replaceAll('-', '').slice(0, 12)}`
  await sql(`CREATE POLICY "${name}" ON realtime.messages ${body}`)
  t.after(() => sql(`DROP POLICY IF EXISTS "${name}" ON realtime.messages`))
}

function onTopic(topic, extra = '') {
  return `(realtime.topic() = ${quote(topic)}${extra ? ` AND ${extra}` : ''})`
}

/** A supabase-js client whose connect and join token carries `role`. */
function member(s, name, role = 'authenticated') {
  return s.client(name, { key: mintToken({ role, sub: randomUUID() }) })
}

function privateChannel(client, topic, config = {}) {
  return client.channel(topic, { config: { ...config, private: true } })
}

/** A service_role member of the private topic (it bypasses RLS) with an inbox of its broadcasts. */
async function admin(s, topic) {
  const channel = privateChannel(s.client('service_role', { key: SERVICE_KEY }), topic)
  const inbox = s.inbox(channel)
  await s.subscribe(channel)
  return { channel, inbox }
}

async function refusal(s, channel) {
  const watch = s.watchStatuses(channel)
  const failure = await watch.next(({ status }) => status !== 'SUBSCRIBED', WAIT_MS, 'the join to fail')
  assert.equal(failure.status, 'CHANNEL_ERROR', s.error(JSON.stringify(failure)).message)
  return failure.message
}

async function closedWithSystemError(s, channel, system) {
  const notice = await system.waitFor((m) => m.status === 'error', WAIT_MS, 'a system error')
  await s.within(
    (async () => {
      while (channel.state !== 'closed') await sleep(50)
    })(),
    WAIT_MS,
    'the channel to close'
  )
  return notice
}

test('C90: a private join without a matching SELECT policy is Unauthorized', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const channel = privateChannel(member(s, 'member'), topic)

  const message = await refusal(s, channel)

  assert.equal(message, `Unauthorized: You do not have permissions to read from this Channel topic: ${topic}`)
})

test('C91: a policy on realtime.topic() admits its topic and refuses another', async (t) => {
  const s = new Scenario(t)
  const room1 = uniqueTopic('room1')
  const room2 = uniqueTopic('room2')
  await policy(t, `FOR SELECT TO authenticated USING ${onTopic(room1)}`)
  const client = member(s, 'member')

  await s.subscribe(privateChannel(client, room1))
  const message = await refusal(s, privateChannel(client, room2))

  assert.equal(message, `Unauthorized: You do not have permissions to read from this Channel topic: ${room2}`)
})

test('C92: read without write drops own sends without an ack and still gets service_role broadcasts', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  await policy(t, `FOR SELECT TO authenticated USING ${onTopic(topic)}`)
  const { channel: service, inbox: serviceInbox } = await admin(s, topic)
  const reader = privateChannel(member(s, 'reader'), topic, { broadcast: { ack: true, self: true } })
  const readerInbox = s.inbox(reader)
  await s.subscribe(reader)

  const result = await reader.send({ type: 'broadcast', event: 'mine', payload: { n: 1 } }, { timeout: ACK_TIMEOUT_MS })
  assert.equal(result, 'timed out', s.error(`send resolved ${result}`).message)

  await service.send({ type: 'broadcast', event: 'from-service', payload: { n: 2 } })
  const got = await readerInbox.waitForEvent('from-service')
  assert.deepEqual(got.payload, { n: 2 })
  await sleep(QUIET_MS)
  assert.equal(serviceInbox.ofEvent('mine').length, 0, s.error('a send without write was delivered').message)
  assert.equal(readerInbox.ofEvent('mine').length, 0, s.error('a send without write came back with self').message)
})

test('a write policy lets a member broadcast on its private topic with an ack', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  await policy(t, `FOR SELECT TO authenticated USING ${onTopic(topic)}`)
  await policy(t, `FOR INSERT TO authenticated WITH CHECK ${onTopic(topic, "extension = 'broadcast'")}`)
  const { inbox } = await admin(s, topic)
  const writer = privateChannel(member(s, 'writer'), topic, { broadcast: { ack: true } })
  await s.subscribe(writer)

  for (const n of [1, 2, 3]) {
    assert.equal(await writer.send({ type: 'broadcast', event: 'ordered', payload: { n } }), 'ok')
  }
  await s.within(
    (async () => {
      while (inbox.ofEvent('ordered').length < 3) await sleep(20)
    })(),
    WAIT_MS,
    'three broadcasts'
  )
  assert.deepEqual(inbox.ofEvent('ordered').map((m) => m.payload.n), [1, 2, 3])
})

test('C93: with presence-only policies a member joins and tracks, and never gets broadcasts', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const presenceOnly = onTopic(topic, "extension = 'presence'")
  await policy(t, `FOR SELECT TO authenticated USING ${presenceOnly}`)
  await policy(t, `FOR INSERT TO authenticated WITH CHECK ${presenceOnly}`)
  const { channel: service } = await admin(s, topic)
  const channel = privateChannel(member(s, 'member'), topic, { presence: { key: 'ann' } })
  const sync = s.inbox(channel, 'sync', 'presence')
  const inbox = s.inbox(channel)
  await s.subscribe(channel)
  await sync.waitForEvent('sync')

  assert.equal(await channel.track({ user: 'ann' }), 'ok')
  await s.within(
    (async () => {
      while (!channel.presenceState().ann) await sleep(20)
    })(),
    WAIT_MS,
    'the own presence in the state'
  )
  assert.equal(channel.presenceState().ann[0].user, 'ann')

  await service.send({ type: 'broadcast', event: 'hidden', payload: {} })
  await sleep(QUIET_MS)
  assert.equal(inbox.items.length, 0, s.error('a presence-only member got a broadcast').message)
})

test('C94: a token refresh to a role without read gets the permission error, then the channel closes', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  await policy(t, `FOR SELECT TO authenticated USING ${onTopic(topic)}`)
  const client = member(s, 'member')
  const channel = privateChannel(client, topic)
  const system = s.inbox(channel, '*', 'system')
  await s.subscribe(channel)

  await client.realtime.setAuth(mintToken({ role: 'anon' }))

  const notice = await closedWithSystemError(s, channel, system)
  assert.equal(notice.message, `You do not have permissions to read from this Channel topic: ${topic}`)
  assert.equal(notice.extension, 'system')
})

test('a token refresh that keeps read keeps the private channel', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  await policy(t, `FOR SELECT TO authenticated USING ${onTopic(topic)}`)
  const { channel: service } = await admin(s, topic)
  const client = member(s, 'member')
  const channel = privateChannel(client, topic)
  const inbox = s.inbox(channel)
  const system = s.inbox(channel, '*', 'system')
  await s.subscribe(channel)

  await client.realtime.setAuth(mintToken({ role: 'authenticated', sub: randomUUID() }))
  await sleep(QUIET_MS)
  await service.send({ type: 'broadcast', event: 'after-refresh', payload: {} })

  await inbox.waitForEvent('after-refresh')
  assert.equal(channel.state, 'joined')
  assert.deepEqual(system.items, [])
})

test('C95: without presence write, track gets an error reply', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  await policy(t, `FOR SELECT TO authenticated USING ${onTopic(topic)}`)
  const channel = privateChannel(member(s, 'member'), topic)
  s.inbox(channel, 'sync', 'presence')
  await s.subscribe(channel)

  assert.equal(await channel.track({ user: 'bob' }), 'error')
  assert.equal(channel.state, 'joined')
})

test('C75: a REST batch private message without write answers 202 and is not delivered', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const { inbox } = await admin(s, topic)
  const post = (event) =>
    fetch(BATCH_URL, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${mintToken({ role: 'authenticated' })}` },
      body: JSON.stringify({ messages: [{ topic, event, payload: {}, private: true }] }),
    })

  const denied = await post('denied')
  assert.equal(denied.status, 202)
  assert.equal(await denied.text(), '')
  await policy(t, `FOR INSERT TO authenticated WITH CHECK ${onTopic(topic)}`)
  assert.equal((await post('allowed')).status, 202)

  await inbox.waitForEvent('allowed')
  assert.equal(inbox.ofEvent('denied').length, 0, s.error('a message without write was delivered').message)
})

test('C76: httpSend on a private channel needs write: 403 Unauthorized, then delivered once allowed', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const { inbox } = await admin(s, topic)
  const sender = privateChannel(member(s, 'http sender'), topic)

  await assert.rejects(sender.httpSend('denied', { n: 1 }), /Unauthorized/)
  await policy(t, `FOR INSERT TO authenticated WITH CHECK ${onTopic(topic)}`)
  assert.deepEqual(await sender.httpSend('allowed', { n: 2 }), { success: true })

  const got = await inbox.waitForEvent('allowed')
  assert.deepEqual(got.payload, { n: 2 })
  assert.equal(inbox.ofEvent('denied').length, 0)
})
