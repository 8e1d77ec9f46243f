import { test } from 'node:test'
import assert from 'node:assert/strict'
import { ANON_KEY, SERVICE_KEY, SUPABASE_URL, Scenario, bytesOf, uniqueTopic } from './helpers.mjs'

const BATCH_URL = `${SUPABASE_URL}/realtime/v1/api/broadcast`

async function subscriber(s, topic, name = 'subscriber') {
  const supabase = s.client(name)
  const channel = supabase.channel(topic)
  const inbox = s.inbox(channel)
  await s.subscribe(channel)
  return { supabase, channel, inbox }
}

function postBatch(messages, headers = {}) {
  return fetch(BATCH_URL, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', ...headers },
    body: JSON.stringify({ messages }),
  })
}

test('channel.httpSend() delivers a JSON payload to a subscribed client', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const { inbox } = await subscriber(s, topic)
  const sender = s.client('http sender').channel(topic)

  assert.equal(typeof sender.httpSend, 'function')
  const result = await sender.httpSend('http-json', { via: 'httpSend', n: 1 })

  assert.deepEqual(result, { success: true })
  const got = await inbox.waitForEvent('http-json')
  assert.deepEqual(got.payload, { via: 'httpSend', n: 1 })
})

test('channel.httpSend() on the subscribed channel itself reaches it', async (t) => {
  const s = new Scenario(t)
  const { channel, inbox } = await subscriber(s, uniqueTopic())

  const result = await channel.httpSend('to-self', { ok: true })

  assert.deepEqual(result, { success: true })
  const got = await inbox.waitForEvent('to-self')
  assert.deepEqual(got.payload, { ok: true })
})

test('channel.httpSend() with an ArrayBuffer delivers the same bytes', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const { inbox } = await subscriber(s, topic)
  const sender = s.client('http sender').channel(topic)
  const bytes = [255, 0, 10, 13, 128]

  const result = await sender.httpSend('http-bin', new Uint8Array(bytes).buffer)

  assert.deepEqual(result, { success: true })
  const got = await inbox.waitForEvent('http-bin')
  assert.ok(got.payload instanceof ArrayBuffer, `payload is ${Object.prototype.toString.call(got.payload)}`)
  assert.deepEqual(bytesOf(got.payload), bytes)
})

test('a raw POST to /realtime/v1/api/broadcast with the service key answers 202 and delivers', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const { inbox } = await subscriber(s, topic)

  const response = await postBatch(
    [
      { topic, event: 'rest-1', payload: { n: 1 } },
      { topic, event: 'rest-2', payload: { n: 2 }, id: 'msg-2' },
    ],
    { Authorization: `Bearer ${SERVICE_KEY}` }
  )

  assert.equal(response.status, 202, await response.clone().text())
  assert.equal(await response.text(), '')
  const first = await inbox.waitForEvent('rest-1')
  const second = await inbox.waitForEvent('rest-2')
  assert.deepEqual(first, { type: 'broadcast', event: 'rest-1', payload: { n: 1 } })
  assert.deepEqual(second.payload, { n: 2 })
  assert.deepEqual(second.meta, { id: 'msg-2' })
})

test('a raw batch POST authorized by the apikey header is accepted', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const { inbox } = await subscriber(s, topic)

  const response = await postBatch([{ topic, event: 'by-apikey', payload: { n: 3 } }], {
    apikey: ANON_KEY,
  })

  assert.equal(response.status, 202, await response.clone().text())
  await inbox.waitForEvent('by-apikey')
})

test('a raw batch POST without a token is refused with 401', async () => {
  const response = await postBatch([{ topic: uniqueTopic(), event: 'nope', payload: {} }])

  assert.equal(response.status, 401)
  assert.deepEqual(await response.json(), { message: 'Unauthorized' })
})

test('send() on a channel that is not subscribed falls back to the REST batch endpoint', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const { inbox } = await subscriber(s, topic)
  const warnings = []
  const sender = s.client('fallback sender', {
    realtime: { logger: (kind, msg) => warnings.push(`${kind}: ${msg}`) },
  })
  await sender.realtime.setAuth(ANON_KEY)
  const channel = sender.channel(topic)

  const status = await channel.send({ type: 'broadcast', event: 'fallback', payload: { n: 5 } })

  assert.equal(status, 'ok')
  assert.ok(warnings.some((w) => w.includes('falling back to REST')))
  const got = await inbox.waitForEvent('fallback')
  assert.deepEqual(got.payload, { n: 5 })
})

test('a batch message without payload is refused with 422', async () => {
  const topic = uniqueTopic()
  const response = await postBatch(
    [
      { topic, event: 'ok', payload: {} },
      { topic, event: 'no-payload' },
    ],
    { Authorization: `Bearer ${SERVICE_KEY}` }
  )

  assert.equal(response.status, 422)
  const body = await response.json()
  assert.ok(Array.isArray(body.errors?.messages), JSON.stringify(body))
  assert.deepEqual(body.errors.messages[1], { payload: ["can't be blank"] })
})

test('a single-message POST with text/plain is refused with 415', async () => {
  const response = await fetch(`${BATCH_URL}/${uniqueTopic()}/events/plain`, {
    method: 'POST',
    headers: { 'Content-Type': 'text/plain', Authorization: `Bearer ${SERVICE_KEY}` },
    body: 'hello',
  })

  assert.equal(response.status, 415)
  assert.deepEqual(await response.json(), {
    error: 'Unsupported Media Type. Use application/json or application/octet-stream',
  })
})

test('a REST batch and httpSend() reach vsn 1.0.0 subscribers as JSON', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const v1 = s.client('v1 subscriber', { realtime: { vsn: '1.0.0' } })
  const channel = v1.channel(topic)
  const inbox = s.inbox(channel)
  await s.subscribe(channel)

  const batch = await postBatch([{ topic, event: 'rest-v1', payload: { n: 1 } }], {
    Authorization: `Bearer ${SERVICE_KEY}`,
  })
  assert.equal(batch.status, 202)
  assert.deepEqual(await channel.httpSend('single-v1', { n: 2 }), { success: true })

  assert.deepEqual(await inbox.waitForEvent('rest-v1'), { type: 'broadcast', event: 'rest-v1', payload: { n: 1 } })
  assert.deepEqual(await inbox.waitForEvent('single-v1'), {
    type: 'broadcast',
    event: 'single-v1',
    payload: { n: 2 },
  })
})
