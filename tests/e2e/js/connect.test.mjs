import { test } from 'node:test'
import assert from 'node:assert/strict'
import WebSocket from 'ws'
import { ANON_KEY, QUIET_MS, SUPABASE_URL, Scenario, mintToken, sleep, uniqueTopic } from './helpers.mjs'

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

test('heartbeats are answered', async (t) => {
  const s = new Scenario(t)
  const beats = []
  const supabase = s.client('heartbeat', {
    realtime: { heartbeatIntervalMs: 200, heartbeatCallback: (status) => beats.push(status) },
  })
  await s.subscribe(supabase.channel(uniqueTopic()))

  await s.within(
    (async () => {
      while (beats.filter((b) => b === 'ok').length < 2) await sleep(50)
    })(),
    5_000,
    'two answered heartbeats'
  )
  assert.ok(!beats.includes('timeout') && !beats.includes('error'), `heartbeat statuses: ${beats}`)
})

// label -> [key, the handshake refusal's reason (401, PROTOCOL.md 1.3)]
const BAD_KEYS = {
  'an expired JWT': [() => mintToken({ role: 'anon', expIn: -60 }), 'Token has expired'],
  'a JWT signed with another secret': [
    () => mintToken({ role: 'anon', secret: 'not-the-server-secret-not-the-server-secret' }),
    'Failed to validate JWT signature',
  ],
  'a JWT without role': [() => mintToken({ role: null }), 'Fields `role` and `exp` are required in JWT'],
  'not a JWT': [() => 'potato', 'The token provided is not a valid JWT'],
}

for (const [label, [makeKey]] of Object.entries(BAD_KEYS)) {
  test(`a client whose key is ${label} never reaches SUBSCRIBED and sees the 401`, async (t) => {
    const s = new Scenario(t)
    const supabase = s.client(label, { key: makeKey() })
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
    assert.ok(
      !s.traceOf(supabase).some((line) => line.includes(' <- ')),
      s.error('the server sent frames to a refused socket').message
    )
    // The transport saw the status, not a parse error (a duplicate Content-Length gives
    // "Parse Error: Duplicate Content-Length" here, and the client never learns why).
    const errors = s.traceOf(supabase).filter((line) => / error /.test(line))
    assert.ok(errors.length > 0, s.error('no transport error recorded').message)
    assert.ok(
      errors.every((line) => line.endsWith(' error Unexpected server response: 401')),
      s.error(`transport errors: ${JSON.stringify(errors)}`).message
    )
  })
}

function rawHandshake(url) {
  return new Promise((resolve, reject) => {
    const socket = new WebSocket(url)
    socket.on('open', () => {
      socket.close()
      resolve({ upgraded: true })
    })
    socket.on('unexpected-response', (request, response) => {
      const chunks = []
      response.on('data', (chunk) => chunks.push(chunk))
      response.on('end', () => {
        request.destroy()
        resolve({ upgraded: false, status: response.statusCode, body: Buffer.concat(chunks).toString() })
      })
    })
    socket.on('error', (error) => {
      if (!String(error.message).includes('Unexpected server response')) reject(error)
    })
  })
}

for (const [label, [makeKey, reason]] of Object.entries(BAD_KEYS)) {
  test(`the handshake of a key that is ${label} is refused with 401 and the reason`, async () => {
    const base = SUPABASE_URL.replace(/^http/, 'ws')

    const result = await rawHandshake(`${base}/realtime/v1/websocket?apikey=${encodeURIComponent(makeKey())}&vsn=2.0.0`)

    assert.equal(result.upgraded, false)
    assert.equal(result.status, 401)
    assert.deepEqual(JSON.parse(result.body), { error: reason })
  })
}

test('the handshake of a valid key upgrades on both websocket paths', async () => {
  const base = SUPABASE_URL.replace(/^http/, 'ws')
  for (const path of ['/realtime/v1/websocket', '/socket/websocket']) {
    const result = await rawHandshake(`${base}${path}?apikey=${ANON_KEY}&vsn=2.0.0`)
    assert.equal(result.upgraded, true, `${path}: ${JSON.stringify(result)}`)
  }
})

const BAD_ACCESS_TOKENS = {
  'an expired JWT': [() => mintToken({ role: 'anon', expIn: -60 }), /^InvalidJWTToken: Token has expired/],
  'a JWT without exp': [() => mintToken({ role: 'anon', expIn: null }), /^InvalidJWTToken: Fields `role` and `exp` are required in JWT/],
  'not a JWT': [() => 'potato', /^MalformedJWT: The token provided is not a valid JWT/],
  'a JWT signed with another secret': [
    () => mintToken({ role: 'anon', secret: 'not-the-server-secret-not-the-server-secret' }),
    /^JwtSignatureError: Failed to validate JWT signature/,
  ],
}

for (const [label, [makeToken, reason]] of Object.entries(BAD_ACCESS_TOKENS)) {
  test(`a join access_token that is ${label} is refused with ${reason.source.slice(1).split(':')[0]}`, async (t) => {
    const s = new Scenario(t)
    const token = makeToken()
    const supabase = s.client(label, { accessToken: async () => token })
    await supabase.realtime.setAuth()
    const channel = supabase.channel(uniqueTopic())

    const watch = s.watchStatuses(channel)
    const failure = await watch.next(({ status }) => FAILED.includes(status), 15_000, 'the join to fail')

    assert.equal(failure.status, 'CHANNEL_ERROR', s.error(JSON.stringify(failure)).message)
    assert.match(failure.message ?? '', reason)
  })
}

test('a join access_token starting with sb_ joins with the connect token', async (t) => {
  const s = new Scenario(t)
  const supabase = s.client('sb_ access token', { accessToken: async () => 'sb_publishable_not_a_jwt' })
  await supabase.realtime.setAuth()
  const channel = supabase.channel(uniqueTopic())

  await s.subscribe(channel)

  const joins = s.traceOf(supabase).filter((line) => line.includes('"phx_join"'))
  assert.ok(joins.some((line) => line.includes('sb_publishable_not_a_jwt')))
})
