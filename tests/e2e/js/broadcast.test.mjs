import { test } from 'node:test'
import assert from 'node:assert/strict'
import { QUIET_MS, Scenario, bytesOf, sleep, uniqueTopic } from './helpers.mjs'

async function pair(s, topic, senderConfig = {}, receiverConfig = {}) {
  const alice = s.client('alice')
  const bob = s.client('bob')
  const sent = alice.channel(topic, { config: { broadcast: senderConfig } })
  const heard = bob.channel(topic, { config: { broadcast: receiverConfig } })
  const aliceInbox = s.inbox(sent)
  const bobInbox = s.inbox(heard)
  await Promise.all([s.subscribe(sent), s.subscribe(heard)])
  return { sent, heard, aliceInbox, bobInbox }
}

test('self:false delivers to the other client but not back to the sender', async (t) => {
  const s = new Scenario(t)
  const { sent, heard, aliceInbox, bobInbox } = await pair(s, uniqueTopic(), { self: false })

  await sent.send({ type: 'broadcast', event: 'greet', payload: { n: 1, text: 'hi' } })
  const got = await bobInbox.waitForEvent('greet')
  assert.deepEqual(got, { type: 'broadcast', event: 'greet', payload: { n: 1, text: 'hi' } })

  await heard.send({ type: 'broadcast', event: 'control', payload: {} })
  await aliceInbox.waitForEvent('control')
  await sleep(QUIET_MS)

  assert.equal(aliceInbox.ofEvent('greet').length, 0, s.error('sender received its own broadcast').message)
  assert.equal(bobInbox.ofEvent('greet').length, 1)
})

test('self:true delivers to the sender as well as the other client', async (t) => {
  const s = new Scenario(t)
  const { sent, aliceInbox, bobInbox } = await pair(s, uniqueTopic(), { self: true })

  await sent.send({ type: 'broadcast', event: 'echo', payload: { n: 2 } })

  const own = await aliceInbox.waitForEvent('echo')
  const other = await bobInbox.waitForEvent('echo')
  assert.deepEqual(own.payload, { n: 2 })
  assert.deepEqual(other.payload, { n: 2 })
  await sleep(QUIET_MS)
  assert.equal(aliceInbox.ofEvent('echo').length, 1)
  assert.equal(bobInbox.ofEvent('echo').length, 1)
})

test('event listeners route by event name and "*" receives everything', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const alice = s.client('alice')
  const bob = s.client('bob')
  const sent = alice.channel(topic)
  const heard = bob.channel(topic)
  const onlyA = s.inbox(heard, 'a')
  const all = s.inbox(heard, '*')
  await Promise.all([s.subscribe(sent), s.subscribe(heard)])

  await sent.send({ type: 'broadcast', event: 'b', payload: { k: 'b' } })
  await sent.send({ type: 'broadcast', event: 'a', payload: { k: 'a' } })
  await onlyA.waitForEvent('a')
  await all.waitForEvent('a')
  await all.waitForEvent('b')

  assert.deepEqual(onlyA.items.map((m) => m.event), ['a'])
})

test('ack:true resolves send() with "ok" once the server replies', async (t) => {
  const s = new Scenario(t)
  const { sent, bobInbox } = await pair(s, uniqueTopic(), { ack: true })

  const status = await s.within(
    sent.send({ type: 'broadcast', event: 'acked', payload: { n: 3 } }),
    12_000,
    'send() with ack to resolve'
  )

  assert.equal(status, 'ok', s.error(`send() resolved ${status}`).message)
  const replies = s.traceOf(sent.socket).filter((line) => line.includes('<- ') && line.includes('"phx_reply"'))
  assert.ok(replies.length >= 2, s.error('expected the join reply and the ack reply').message)
  await bobInbox.waitForEvent('acked')
})

test('ack:true also acknowledges a binary payload', async (t) => {
  const s = new Scenario(t)
  const { sent, bobInbox } = await pair(s, uniqueTopic(), { ack: true })

  const status = await s.within(
    sent.send({ type: 'broadcast', event: 'blob', payload: new Uint8Array([9, 8, 7]).buffer }),
    12_000,
    'binary send() with ack to resolve'
  )

  assert.equal(status, 'ok', s.error(`send() resolved ${status}`).message)
  const got = await bobInbox.waitForEvent('blob')
  assert.deepEqual(bytesOf(got.payload), [9, 8, 7])
})

test('ack:false resolves send() with "ok" at once and still delivers', async (t) => {
  const s = new Scenario(t)
  const { sent, bobInbox } = await pair(s, uniqueTopic(), { ack: false })

  const started = performance.now()
  const status = await sent.send({ type: 'broadcast', event: 'fire', payload: { n: 4 } })
  const elapsed = performance.now() - started

  assert.equal(status, 'ok')
  assert.ok(elapsed < 200, `send() without ack took ${elapsed} ms`)
  const got = await bobInbox.waitForEvent('fire')
  assert.deepEqual(got.payload, { n: 4 })
})

test('a binary payload arrives at another vsn 2.0.0 client as the same bytes', async (t) => {
  const s = new Scenario(t)
  const { sent, bobInbox } = await pair(s, uniqueTopic())
  const bytes = [0, 1, 2, 127, 128, 200, 255, 0xc3, 0x28, 0]

  await sent.send({ type: 'broadcast', event: 'bin', payload: new Uint8Array(bytes).buffer })
  const got = await bobInbox.waitForEvent('bin')

  assert.equal(got.type, 'broadcast')
  assert.equal(got.event, 'bin')
  assert.ok(got.payload instanceof ArrayBuffer, `payload is ${Object.prototype.toString.call(got.payload)}`)
  assert.deepEqual(bytesOf(got.payload), bytes)
  assert.equal(got.meta, undefined)
})

function kind4(frame) {
  const [kind, topicLen, eventLen, metaLen, encoding] = frame
  let offset = 5
  const topic = frame.subarray(offset, (offset += topicLen)).toString()
  const event = frame.subarray(offset, (offset += eventLen)).toString()
  const meta = frame.subarray(offset, (offset += metaLen)).toString()
  return { kind, topic, event, meta, encoding, payload: frame.subarray(offset) }
}

test('a JSON send() from vsn 2.0.0 reaches vsn 2.0.0 as a kind-4 frame with the sent bytes', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const { sent, heard, bobInbox } = await pair(s, topic)
  const payload = { x: 1, text: 'é', list: [true, null] }

  await sent.send({ type: 'broadcast', event: 'cursor', payload })
  await bobInbox.waitForEvent('cursor')

  const frames = s.framesContaining(heard.socket, 'cursor')
  assert.equal(frames.length, 1, s.error('expected one frame').message)
  assert.equal(frames[0][0], 4, s.error(`frame kind ${frames[0][0]}`).message)
  assert.deepEqual(kind4(frames[0]), {
    kind: 4,
    topic: `realtime:${topic}`,
    event: 'cursor',
    meta: '',
    encoding: 1,
    payload: Buffer.from(JSON.stringify(payload)),
  })
})

test('a binary send() reaches vsn 2.0.0 as a kind-4 frame with encoding 0', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const { sent, heard, bobInbox } = await pair(s, topic)

  await sent.send({ type: 'broadcast', event: 'raw', payload: new Uint8Array([5, 6, 7]).buffer })
  await bobInbox.waitForEvent('raw')

  const [frame] = s.framesContaining(heard.socket, 'raw')
  assert.deepEqual(kind4(frame), {
    kind: 4,
    topic: `realtime:${topic}`,
    event: 'raw',
    meta: '',
    encoding: 0,
    payload: Buffer.from([5, 6, 7]),
  })
})

test('a 1.5 MB broadcast under the 3000 KB limit is acknowledged and delivered', async (t) => {
  const s = new Scenario(t)
  const { sent, bobInbox } = await pair(s, uniqueTopic(), { ack: true })
  const big = 'y'.repeat(1_500_000)

  const status = await s.within(
    sent.send({ type: 'broadcast', event: 'large', payload: { big } }),
    12_000,
    'the large send() to resolve'
  )

  assert.equal(status, 'ok', s.error(`large send() resolved ${status}`).message)
  const got = await bobInbox.waitForEvent('large')
  assert.equal(got.payload.big.length, big.length)
})

test('an oversized broadcast with ack resolves "error" and is not delivered', async (t) => {
  const s = new Scenario(t)
  const { sent, heard, aliceInbox, bobInbox } = await pair(s, uniqueTopic(), { ack: true })
  const big = 'x'.repeat(3_100_000)

  const status = await s.within(
    sent.send({ type: 'broadcast', event: 'too-big', payload: { big } }),
    12_000,
    'the oversized send() to resolve'
  )
  await heard.send({ type: 'broadcast', event: 'control', payload: {} })
  await aliceInbox.waitForEvent('control')
  await sleep(QUIET_MS)

  assert.equal(status, 'error', s.error(`oversized send() resolved ${status}`).message)
  assert.equal(bobInbox.ofEvent('too-big').length, 0)
  const replies = s.traceOf(sent.socket).filter((line) => line.includes('payload_size_exceeded'))
  assert.equal(replies.length, 1, s.error('expected a payload_size_exceeded reply').message)
})

test('an empty binary payload arrives as an empty ArrayBuffer', async (t) => {
  const s = new Scenario(t)
  const { sent, bobInbox } = await pair(s, uniqueTopic())

  await sent.send({ type: 'broadcast', event: 'empty', payload: new ArrayBuffer(0) })
  const got = await bobInbox.waitForEvent('empty')

  assert.ok(got.payload instanceof ArrayBuffer)
  assert.equal(got.payload.byteLength, 0)
})

test('unicode topic content and event names survive the binary framing', async (t) => {
  const s = new Scenario(t)
  const { sent, bobInbox } = await pair(s, uniqueTopic('salle-é'))

  await sent.send({ type: 'broadcast', event: 'café-☕', payload: { text: 'naïve 🎉' } })
  const got = await bobInbox.waitForEvent('café-☕')

  assert.deepEqual(got.payload, { text: 'naïve 🎉' })
})

test('a broadcast on room A never reaches a subscriber only on room B', async (t) => {
  const s = new Scenario(t)
  const roomA = uniqueTopic('room-a')
  const roomB = uniqueTopic('room-b')
  const sender = s.client('sender')
  const listenerA = s.client('listener on A')
  const listenerB = s.client('listener on B')
  const sendA = sender.channel(roomA)
  const sendB = sender.channel(roomB)
  const onA = listenerA.channel(roomA)
  const onB = listenerB.channel(roomB)
  const inboxA = s.inbox(onA)
  const inboxB = s.inbox(onB)
  await Promise.all([sendA, sendB, onA, onB].map((channel) => s.subscribe(channel)))

  await sendA.send({ type: 'broadcast', event: 'secret', payload: { room: 'A' } })
  await sendA.send({ type: 'broadcast', event: 'secret-bin', payload: new Uint8Array([1]).buffer })
  await inboxA.waitForEvent('secret')
  await inboxA.waitForEvent('secret-bin')
  await sendB.send({ type: 'broadcast', event: 'control', payload: { room: 'B' } })
  await inboxB.waitForEvent('control')
  await sleep(QUIET_MS)

  assert.deepEqual(
    inboxB.items.map((m) => m.event),
    ['control'],
    s.error('room B saw a message that was not its own').message
  )
  assert.equal(inboxA.ofEvent('control').length, 0)
  assert.deepEqual(
    s.framesContaining(listenerB, roomA).map(String),
    [],
    s.error('room A frames were written to the socket of a room B subscriber').message
  )
  assert.deepEqual(s.framesContaining(listenerA, roomB).map(String), [])
})

test('after leaving a room the client receives nothing more from it', async (t) => {
  const s = new Scenario(t)
  const { sent, heard, bobInbox } = await pair(s, uniqueTopic())
  const bob = heard.socket
  const other = bob.channel(uniqueTopic('other'))
  const otherInbox = s.inbox(other)
  await s.subscribe(other)
  const alice = sent.socket
  const otherSender = alice.channel(other.subTopic)
  await s.subscribe(otherSender)

  assert.equal(await heard.unsubscribe(), 'ok')
  await sent.send({ type: 'broadcast', event: 'after-leave', payload: {} })
  await otherSender.send({ type: 'broadcast', event: 'control', payload: {} })
  await otherInbox.waitForEvent('control')
  await sleep(QUIET_MS)

  assert.equal(bobInbox.ofEvent('after-leave').length, 0)
})
