import { test } from 'node:test'
import assert from 'node:assert/strict'
import { QUIET_MS, Scenario, bytesOf, sleep, uniqueTopic } from './helpers.mjs'

const V1 = { realtime: { vsn: '1.0.0' } }

async function join(s, name, topic, options = {}, config = {}) {
  const supabase = s.client(name, options)
  const channel = supabase.channel(topic, { config: { broadcast: config } })
  const inbox = s.inbox(channel)
  await s.subscribe(channel)
  return { supabase, channel, inbox }
}

function sentFrames(s, supabase) {
  return s.traceOf(supabase).filter((line) => line.includes(' -> '))
}

test('realtime.vsn "1.0.0" connects with vsn=1.0.0 and speaks JSON objects', async (t) => {
  const s = new Scenario(t)
  const { supabase } = await join(s, 'v1', uniqueTopic(), V1)

  assert.equal(supabase.realtime.vsn, '1.0.0')
  assert.match(supabase.realtime.endpointURL(), /[?&]vsn=1\.0\.0(&|$)/)
  const frames = sentFrames(s, supabase)
  assert.ok(frames.length > 0)
  for (const frame of frames) {
    assert.match(frame, / -> \{"topic":/)
  }
  const received = s.traceOf(supabase).filter((line) => line.includes(' <- '))
  assert.ok(received.length > 0)
  for (const frame of received) {
    assert.match(frame, / <- \{/)
    const body = JSON.parse(frame.slice(frame.indexOf(' <- ') + 4))
    assert.ok('ref' in body, `vsn 1 frame without ref: ${frame}`)
    assert.ok(!('join_ref' in body), `vsn 1 frame with join_ref: ${frame}`)
  }
})

test('vsn 1.0.0 to vsn 1.0.0: JSON broadcasts flow both ways, self:false respected', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const a = await join(s, 'v1 a', topic, V1)
  const b = await join(s, 'v1 b', topic, V1)

  await a.channel.send({ type: 'broadcast', event: 'from-a', payload: { n: 1 } })
  const atB = await b.inbox.waitForEvent('from-a')
  await b.channel.send({ type: 'broadcast', event: 'from-b', payload: { n: 2 } })
  const atA = await a.inbox.waitForEvent('from-b')
  await sleep(QUIET_MS)

  assert.deepEqual(atB, { type: 'broadcast', event: 'from-a', payload: { n: 1 } })
  assert.deepEqual(atA, { type: 'broadcast', event: 'from-b', payload: { n: 2 } })
  assert.equal(a.inbox.ofEvent('from-a').length, 0)
  assert.equal(b.inbox.ofEvent('from-b').length, 0)
})

test('vsn 1.0.0 with ack:true resolves send() with "ok"', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const a = await join(s, 'v1 acked', topic, V1, { ack: true })
  const b = await join(s, 'v1 b', topic, V1)

  const status = await s.within(
    a.channel.send({ type: 'broadcast', event: 'acked', payload: { n: 1 } }),
    12_000,
    'vsn 1 ack'
  )

  assert.equal(status, 'ok')
  await b.inbox.waitForEvent('acked')
})

test('vsn 1.0.0 and vsn 2.0.0 clients exchange JSON broadcasts', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const v1 = await join(s, 'v1', topic, V1)
  const v2 = await join(s, 'v2', topic)

  await v1.channel.send({ type: 'broadcast', event: 'from-v1', payload: { list: [1, 'two', null], nested: { ok: true } } })
  const atV2 = await v2.inbox.waitForEvent('from-v1')
  await v2.channel.send({ type: 'broadcast', event: 'from-v2', payload: { text: 'héllo', n: 2.5 } })
  const atV1 = await v1.inbox.waitForEvent('from-v2')

  assert.deepEqual(atV2, {
    type: 'broadcast',
    event: 'from-v1',
    payload: { list: [1, 'two', null], nested: { ok: true } },
  })
  assert.deepEqual(atV1, { type: 'broadcast', event: 'from-v2', payload: { text: 'héllo', n: 2.5 } })
  const [wire] = s.framesContaining(v2.supabase, 'from-v1')
  const frame = JSON.parse(wire.toString())
  assert.deepEqual(
    frame,
    [null, null, `realtime:${topic}`, 'broadcast', atV2],
    s.error('a vsn 1 broadcast must reach vsn 2 as a text frame with null refs').message
  )
})

test('a binary broadcast from vsn 2.0.0 reaches vsn 2.0.0 but not vsn 1.0.0', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const sender = await join(s, 'v2 sender', topic)
  const v2 = await join(s, 'v2 receiver', topic)
  const v1 = await join(s, 'v1 receiver', topic, V1)
  const bytes = [1, 2, 3, 0, 254]

  await sender.channel.send({ type: 'broadcast', event: 'bin', payload: new Uint8Array(bytes).buffer })
  const atV2 = await v2.inbox.waitForEvent('bin')
  await sender.channel.send({ type: 'broadcast', event: 'control', payload: { after: 'bin' } })
  await v1.inbox.waitForEvent('control')
  await v2.inbox.waitForEvent('control')
  await sleep(QUIET_MS)

  assert.ok(atV2.payload instanceof ArrayBuffer)
  assert.deepEqual(bytesOf(atV2.payload), bytes)
  assert.deepEqual(
    v1.inbox.items.map((m) => m.event),
    ['control'],
    s.error('the vsn 1 client saw the binary broadcast').message
  )
})
