import { test } from 'node:test'
import assert from 'node:assert/strict'
import { QUIET_MS, Scenario, mintToken, sleep, uniqueTopic } from './helpers.mjs'

const FAILED = ['CHANNEL_ERROR', 'TIMED_OUT', 'CLOSED']

test('a channel subscribe reaches SUBSCRIBED', async (t) => {
  const s = new Scenario(t)
  const supabase = s.client('anon')
  const channel = supabase.channel(uniqueTopic())

  await s.subscribe(channel)

  assert.equal(channel.state, 'joined')
  assert.ok(supabase.realtime.isConnected())
  const url = supabase.realtime.endpointURL()
  assert.match(url, /^ws:\/\/.+\/realtime\/v1\/websocket\?/)
  assert.match(url, /[?&]vsn=2\.0\.0(&|$)/)
})

test('several channels on one socket all reach SUBSCRIBED', async (t) => {
  const s = new Scenario(t)
  const supabase = s.client('anon')
  const channels = [0, 1, 2].map(() => supabase.channel(uniqueTopic()))

  await Promise.all(channels.map((channel) => s.subscribe(channel)))

  assert.deepEqual(
    channels.map((channel) => channel.state),
    ['joined', 'joined', 'joined']
  )
})

test('a client whose key is an expired JWT never reaches SUBSCRIBED', async (t) => {
  const s = new Scenario(t)
  const expired = mintToken({ role: 'anon', expIn: -60 })
  const supabase = s.client('expired key', { key: expired })
  const channel = supabase.channel(uniqueTopic())

  const watch = s.watchStatuses(channel)
  const failure = await watch.next(
    ({ status }) => FAILED.includes(status),
    15_000,
    'CHANNEL_ERROR, TIMED_OUT or CLOSED'
  )
  await sleep(QUIET_MS * 3)

  assert.ok(FAILED.includes(failure.status))
  assert.ok(
    !watch.statuses.some(({ status }) => status === 'SUBSCRIBED'),
    s.error(`statuses: ${JSON.stringify(watch.statuses)}`).message
  )
  assert.notEqual(channel.state, 'joined')
})

test('an expired join access_token is refused with InvalidJWTToken', async (t) => {
  const s = new Scenario(t)
  const expired = mintToken({ role: 'anon', expIn: -60 })
  const supabase = s.client('expired access token', { accessToken: async () => expired })
  await supabase.realtime.setAuth()
  const channel = supabase.channel(uniqueTopic())

  const watch = s.watchStatuses(channel)
  const failure = await watch.next(
    ({ status }) => FAILED.includes(status),
    15_000,
    'the join to fail'
  )

  assert.equal(failure.status, 'CHANNEL_ERROR', s.error(JSON.stringify(failure)).message)
  assert.match(failure.message ?? '', /^InvalidJWTToken: Token has expired/)
  assert.ok(!watch.statuses.some(({ status }) => status === 'SUBSCRIBED'))
})
