import { test } from 'node:test'
import assert from 'node:assert/strict'
import { QUIET_MS, Scenario, WAIT_MS, mintToken, sleep, uniqueTopic } from './helpers.mjs'

const SHORT_LIFE_S = 3

async function room(s, topic, options = {}) {
  const listener = s.client('listener', options)
  if (options.accessToken) {
    await listener.realtime.setAuth()
  }
  const channel = listener.channel(topic)
  const inbox = s.inbox(channel)
  const system = s.inbox(channel, '*', 'system')
  await s.subscribe(channel)
  return { listener, channel, inbox, system }
}

test('realtime.setAuth(newToken) keeps the channel working', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const { listener, channel, inbox, system } = await room(s, topic)
  const sender = s.client('sender').channel(topic)
  await s.subscribe(sender)

  const fresh = mintToken({ role: 'authenticated', sub: 'user-1', expIn: 3600 })
  await listener.realtime.setAuth(fresh)
  assert.equal(listener.realtime.accessTokenValue, fresh)
  await sleep(QUIET_MS)

  await sender.send({ type: 'broadcast', event: 'after-refresh', payload: { n: 1 } })
  await inbox.waitForEvent('after-refresh')
  assert.equal(channel.state, 'joined')
  assert.deepEqual(
    system.items.filter((m) => m.status === 'error'),
    [],
    s.error('a system error followed the refresh').message
  )
  const pushed = s.traceOf(listener).filter((line) => line.includes(' -> ') && line.includes('"access_token"'))
  assert.ok(pushed.some((line) => line.includes(fresh)), s.error('no access_token push with the new token').message)
})

test('setAuth with a fresh token keeps the channel past the old token expiry', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  let current = mintToken({ role: 'anon', expIn: SHORT_LIFE_S })
  const expiresAt = Date.now() + SHORT_LIFE_S * 1000
  const { listener, channel, inbox, system } = await room(s, topic, { accessToken: async () => current })
  const sender = s.client('sender').channel(topic)
  await s.subscribe(sender)

  current = mintToken({ role: 'anon', expIn: 3600 })
  await listener.realtime.setAuth(current)
  await sleep(Math.max(0, expiresAt - Date.now()) + 2_000)

  await sender.send({ type: 'broadcast', event: 'still-here', payload: { n: 2 } })
  await inbox.waitForEvent('still-here')
  assert.equal(channel.state, 'joined', s.error(`channel state ${channel.state}`).message)
  assert.deepEqual(
    channel.statuses,
    ['SUBSCRIBED'],
    s.error(`statuses ${JSON.stringify(channel.statuses)}`).message
  )
  assert.deepEqual(system.items.filter((m) => m.status === 'error'), [])
})

test('without a refresh, an expiring join token closes the channel', async (t) => {
  const s = new Scenario(t)
  const topic = uniqueTopic()
  const short = mintToken({ role: 'anon', expIn: SHORT_LIFE_S })
  const { channel, system } = await room(s, topic, { accessToken: async () => short })

  const notice = await system.waitFor(
    (m) => m.status === 'error',
    SHORT_LIFE_S * 1000 + WAIT_MS,
    'a system error at token expiry'
  )
  assert.match(notice.message, /^Token has expired/)
  assert.equal(notice.extension, 'system')
  await s.within(
    (async () => {
      while (!channel.statuses.includes('CLOSED')) await sleep(50)
    })(),
    WAIT_MS,
    'the channel to be CLOSED'
  )
  assert.equal(channel.state, 'closed')
})

test('setAuth with an expired token gets a system error and closes the channel', async (t) => {
  const s = new Scenario(t)
  const { listener, channel, system } = await room(s, uniqueTopic())

  await listener.realtime.setAuth(mintToken({ role: 'anon', expIn: -30 }))

  const notice = await system.waitFor((m) => m.status === 'error', WAIT_MS, 'a system error')
  assert.match(notice.message, /^Token has expired/)
  await s.within(
    (async () => {
      while (!channel.statuses.includes('CLOSED')) await sleep(50)
    })(),
    WAIT_MS,
    'the channel to be CLOSED'
  )
})
