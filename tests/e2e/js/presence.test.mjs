import { test } from 'node:test'
import assert from 'node:assert/strict'
import { QUIET_MS, Scenario, WAIT_MS, sleep, uniqueTopic } from './helpers.mjs'

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i

/** A channel with inboxes for the three presence callbacks (registering them enables presence). */
function watched(s, client, topic, config = {}) {
  const channel = client.channel(topic, { config })
  const sync = s.inbox(channel, 'sync', 'presence')
  const joins = s.inbox(channel, 'join', 'presence')
  const leaves = s.inbox(channel, 'leave', 'presence')
  return { channel, sync, joins, leaves }
}

/** Subscribe and wait for the first `sync`, i.e. the presence_state of this join. */
async function joinedWithState(s, room) {
  await s.subscribe(room.channel)
  await room.sync.waitForEvent('sync')
  return room
}

/** The text frames with `event` that `client` received, parsed (vsn 2.0.0 arrays). */
function framesOf(s, client, event) {
  return s
    .framesContaining(client, `"${event}"`)
    .filter((frame) => frame[0] === 0x5b)
    .map((frame) => JSON.parse(frame.toString()))
    .filter((frame) => frame[3] === event)
}

function hasUser(presences, user) {
  return presences.some((p) => p.user === user)
}

async function track(s, channel, payload, what = 'track()') {
  const status = await s.within(channel.track(payload), WAIT_MS + 2_000, what)
  assert.equal(status, 'ok', s.error(`${what} resolved ${status}`).message)
}

test('C80: a presence listener gets presence_state {} and a sync; without presence no presence_state', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const alice = s.client('alice')
  const room = await joinedWithState(s, watched(s, alice, topic))

  assert.deepEqual(room.channel.presenceState(), {})
  const states = framesOf(s, alice, 'presence_state')
  assert.equal(states.length, 1, s.error('expected one presence_state').message)
  assert.deepEqual(states[0][4], {})
  assert.equal(states[0][0], room.channel.joinPush.ref, 'presence_state carries the join_ref')

  const bob = s.client('bob')
  const plain = bob.channel(topic, { config: { presence: { enabled: false } } })
  await s.subscribe(plain)
  const enabled = bob.channel(`${topic}-control`, { config: { presence: { enabled: true } } })
  await s.subscribe(enabled)
  await s.within(
    (async () => {
      while (framesOf(s, bob, 'presence_state').length === 0) await sleep(20)
    })(),
    WAIT_MS,
    'presence_state of the config-enabled channel'
  )
  await sleep(QUIET_MS)
  const bobStates = framesOf(s, bob, 'presence_state')
  assert.deepEqual(
    bobStates.map((frame) => frame[2]),
    [enabled.topic],
    s.error('only the channel with presence enabled gets presence_state').message
  )
})

test('C81: track resolves ok and every channel on the topic sees the join, tracker included', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const tracker = await joinedWithState(s, watched(s, s.client('alice'), topic))
  const observer = await joinedWithState(s, watched(s, s.client('bob'), topic))

  await track(s, tracker.channel, { user: 'a' })

  const seen = await observer.joins.waitFor((m) => hasUser(m.newPresences, 'a'), WAIT_MS, 'the join of user a')
  assert.equal(typeof seen.key, 'string')
  assert.ok(seen.key.length > 0)
  const [presence] = seen.newPresences
  assert.equal(typeof presence.presence_ref, 'string')
  assert.equal(presence.phx_ref, undefined)
  assert.equal(presence.phx_ref_prev, undefined)
  const own = await tracker.joins.waitFor((m) => hasUser(m.newPresences, 'a'), WAIT_MS, 'the tracker\'s own join')
  assert.equal(own.key, seen.key)

  const state = observer.channel.presenceState()
  assert.deepEqual(Object.keys(state), [seen.key])
  assert.equal(state[seen.key].length, 1)
  assert.equal(state[seen.key][0].user, 'a')
  assert.equal(state[seen.key][0].presence_ref, presence.presence_ref)
  assert.deepEqual(tracker.channel.presenceState(), state)
})

test('C82: the key is config.presence.key, or a server UUID when it is empty', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const observer = await joinedWithState(s, watched(s, s.client('observer'), topic))
  const named = s.client('named').channel(topic, { config: { presence: { key: 'u1' } } })
  const anonymous = s.client('anonymous').channel(topic)
  await Promise.all([s.subscribe(named), s.subscribe(anonymous)])

  await track(s, named, { user: 'named' })
  await track(s, anonymous, { user: 'anonymous' })

  const fromNamed = await observer.joins.waitFor((m) => hasUser(m.newPresences, 'named'), WAIT_MS, 'named join')
  const fromAnonymous = await observer.joins.waitFor(
    (m) => hasUser(m.newPresences, 'anonymous'),
    WAIT_MS,
    'anonymous join'
  )
  assert.equal(fromNamed.key, 'u1')
  assert.match(fromAnonymous.key, UUID)
  assert.deepEqual(Object.keys(observer.channel.presenceState()).sort(), ['u1', fromAnonymous.key].sort())
})

test('C83: a later joiner\'s presence_state contains the earlier tracker', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const early = s.client('early').channel(topic, { config: { presence: { key: 'early' } } })
  await s.subscribe(early)
  await track(s, early, { user: 'early', n: 1 })

  const late = s.client('late')
  const room = await joinedWithState(s, watched(s, late, topic))

  const [state] = framesOf(s, late, 'presence_state')
  assert.ok(state, s.error('no presence_state').message)
  assert.deepEqual(Object.keys(state[4]), ['early'])
  assert.equal(state[4].early.metas[0].user, 'early')
  assert.equal(typeof state[4].early.metas[0].phx_ref, 'string')
  const presences = room.channel.presenceState().early
  assert.equal(presences.length, 1)
  assert.equal(presences[0].user, 'early')
  assert.equal(presences[0].n, 1)
  const joined = await room.joins.waitFor((m) => m.key === 'early', WAIT_MS, 'join from presence_state')
  assert.ok(hasUser(joined.newPresences, 'early'))
})

test('C84/C85: re-tracking the same payload is silent; a changed payload is an update', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const observer = await joinedWithState(s, watched(s, s.client('observer'), topic))
  const tracker = s.client('tracker').channel(topic, { config: { presence: { key: 'k' } } })
  const control = s.client('control').channel(topic, { config: { presence: { key: 'control' } } })
  await Promise.all([s.subscribe(tracker), s.subscribe(control)])

  await track(s, tracker, { user: 'a' })
  const first = await observer.joins.waitFor((m) => m.key === 'k', WAIT_MS, 'the first join')
  const firstRef = first.newPresences[0].presence_ref

  await track(s, tracker, { user: 'a' }, 'identical re-track')
  await track(s, control, { user: 'control' })
  await observer.joins.waitFor((m) => m.key === 'control', WAIT_MS, 'the control join')
  await sleep(QUIET_MS)
  assert.equal(observer.joins.count((m) => m.key === 'k'), 1, s.error('identical re-track gave a join').message)
  assert.equal(observer.leaves.count((m) => m.key === 'k'), 0, s.error('identical re-track gave a leave').message)

  await track(s, tracker, { user: 'a2' }, 'changed re-track')
  const update = await observer.joins.waitFor((m) => m.key === 'k' && hasUser(m.newPresences, 'a2'), WAIT_MS, 'the update')
  const left = await observer.leaves.waitFor((m) => m.key === 'k', WAIT_MS, 'the leave of the old meta')
  assert.deepEqual(left.leftPresences.map((p) => p.presence_ref), [firstRef])
  assert.equal(left.leftPresences[0].user, 'a')
  assert.notEqual(update.newPresences[0].presence_ref, firstRef)
  const state = observer.channel.presenceState()
  assert.deepEqual(state.k.map((p) => p.user), ['a2'])

  const diffs = framesOf(s, observer.channel.socket, 'presence_diff').filter((f) => f[4].joins.k || f[4].leaves.k)
  assert.equal(diffs.length, 2, s.error('expected the join and one update diff for key k').message)
  const [, updateFrame] = diffs
  assert.equal(updateFrame[4].joins.k.metas[0].phx_ref_prev, firstRef)
  assert.equal(updateFrame[4].leaves.k.metas[0].phx_ref, firstRef)
})

test('C86: untrack, unsubscribe, removeAllChannels and disconnect each fire leave on the observer', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const observer = await joinedWithState(s, watched(s, s.client('observer'), topic))
  const ends = {
    untrack: (client, channel) => channel.untrack(),
    unsubscribe: (client, channel) => channel.unsubscribe(),
    'remove-all': (client) => client.removeAllChannels(),
    disconnect: (client) => client.realtime.disconnect(),
  }

  for (const [how, end] of Object.entries(ends)) {
    const client = s.client(how)
    const channel = client.channel(topic, { config: { presence: { key: how } } })
    await s.subscribe(channel)
    await track(s, channel, { how })
    await observer.joins.waitFor((m) => m.key === how, WAIT_MS, `the join of ${how}`)

    await s.within(end(client, channel), WAIT_MS + 2_000, how)

    const left = await observer.leaves.waitFor((m) => m.key === how, WAIT_MS, `the leave after ${how}`)
    assert.equal(left.leftPresences.length, 1)
    assert.equal(left.leftPresences[0].how, how)
    assert.equal(observer.channel.presenceState()[how], undefined, s.error(`${how} still in presenceState`).message)
  }
  assert.deepEqual(observer.channel.presenceState(), {})
})

test('C88: a 6th presence push within 30 s gets "Client presence rate limit exceeded" and closes', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const observer = await joinedWithState(s, watched(s, s.client('observer'), topic))
  const tracker = s.client('tracker').channel(topic, { config: { presence: { key: 'busy' } } })
  const system = s.inbox(tracker, '*', 'system')
  await s.subscribe(tracker)

  for (let n = 1; n <= 5; n += 1) {
    await track(s, tracker, { n }, `track ${n}`)
  }
  assert.deepEqual(system.items.filter((m) => m.status === 'error'), [])
  const sixth = tracker.track({ n: 6 }, { timeout: 3_000 })

  const notice = await system.waitFor((m) => m.status === 'error', WAIT_MS, 'the rate limit error')
  assert.equal(notice.message, 'Client presence rate limit exceeded')
  assert.equal(notice.extension, 'system')
  await s.within(
    (async () => {
      while (!tracker.statuses.includes('CLOSED')) await sleep(50)
    })(),
    WAIT_MS,
    'the channel to be CLOSED'
  )
  assert.equal(tracker.state, 'closed')
  assert.notEqual(await sixth, 'ok')
  await observer.leaves.waitFor(
    (m) => m.key === 'busy' && m.leftPresences.some((p) => p.n === 5),
    WAIT_MS,
    'the leave of the closed channel'
  )
  assert.equal(observer.channel.presenceState().busy, undefined, s.error('busy still in presenceState').message)
})

test('C89: event "TRACK" in upper case is accepted', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const observer = await joinedWithState(s, watched(s, s.client('observer'), topic))
  const tracker = s.client('tracker').channel(topic, { config: { presence: { key: 'upper' } } })
  await s.subscribe(tracker)

  const status = await s.within(
    tracker.send({ type: 'presence', event: 'TRACK', payload: { user: 'upper' } }),
    WAIT_MS + 2_000,
    'send() of an upper-case TRACK'
  )

  const sent = s.traceOf(tracker.socket).filter((line) => line.includes(' -> ') && line.includes('"TRACK"'))
  if (sent.length === 0) {
    t.skip('supabase-js did not send the event in upper case')
    return
  }
  assert.equal(status, 'ok', s.error(`send() resolved ${status}`).message)
  const joined = await observer.joins.waitFor((m) => m.key === 'upper', WAIT_MS, 'the join from TRACK')
  assert.equal(joined.newPresences[0].user, 'upper')
})
