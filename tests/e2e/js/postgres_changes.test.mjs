import { before, test } from 'node:test'
import assert from 'node:assert/strict'
import { QUIET_MS, Scenario, WAIT_MS, mintToken, sleep, sql, uniqueTopic } from './helpers.mjs'
import { PUBLICATION, SUBSCRIBED, TODO_COLUMNS, changes, createTable, subscribeChanges } from './changes.mjs'

const TIMESTAMP = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/
const NO_PRIMARY_KEY = 'Error 400: Bad Request, no primary key'
const NOT_PUBLISHED = 'Unable to subscribe to changes with given parameters. Please check Realtime is enabled'

before(async () => {
  await sql('--roles')
})

/** Subscribe and resolve with the first postgres_changes system message, expected to be an error. */
async function subscribeError(s, channel) {
  const system = s.inbox(channel, '*', 'system')
  await s.subscribe(channel)
  const message = await system.waitFor((m) => m.extension === 'postgres_changes', WAIT_MS, 'the postgres_changes system message')
  assert.equal(message.status, 'error', s.error(`expected an error, got ${JSON.stringify(message)}`).message)
  assert.equal(message.channel, channel.subTopic)
  return message
}

/** The raw vsn 2.0.0 postgres_changes frames `client` received for `channel`. */
function rawChanges(s, client, channel) {
  const frames = []
  for (const buffer of s.framesContaining(client, '"postgres_changes"')) {
    let frame
    try {
      frame = JSON.parse(buffer.toString('utf8'))
    } catch {
      continue
    }
    if (Array.isArray(frame) && frame[2] === channel.topic && frame[3] === 'postgres_changes') frames.push(frame)
  }
  return frames
}

function bindingIds(channel) {
  return channel.bindings.postgres_changes.map((binding) => binding.id)
}

async function channelFor(s, name, bindings, options = {}) {
  const client = s.client(name, options)
  const channel = client.channel(uniqueTopic('db'))
  const boxes = bindings.map((binding) => changes(s, channel, binding))
  return { client, channel, boxes }
}

test('an INSERT arrives once with typed values, its binding id and a millisecond UTC timestamp', async (t) => {
  const s = new Scenario(t)
  const table = await createTable(t)
  const { client, channel, boxes } = await channelFor(s, 'listener', [{ event: 'INSERT', schema: 'public', table }])
  await subscribeChanges(s, channel)

  await sql(
    `INSERT INTO public.${table} VALUES (1, 'a', 7, true, '{"k": [1, 2], "s": "x"}', '{x,y}', NULL)`
  )
  const got = await boxes[0].waitFor((p) => p.new.id === 1, WAIT_MS, 'the INSERT')

  const record = { id: 1, title: 'a', n: 7, done: true, meta: { k: [1, 2], s: 'x' }, tags: ['x', 'y'], note: null }
  assert.equal(got.eventType, 'INSERT')
  assert.equal(got.schema, 'public')
  assert.equal(got.table, table)
  assert.match(got.commit_timestamp, TIMESTAMP)
  assert.deepEqual(got.new, record)
  assert.deepEqual(got.old, {})
  assert.equal(got.errors, null)

  await sleep(QUIET_MS)
  const frames = rawChanges(s, client, channel)
  assert.equal(frames.length, 1, s.error(`expected one frame, got ${frames.length}`).message)
  const [joinRef, ref, , , payload] = frames[0]
  assert.equal(joinRef, null)
  assert.equal(ref, null)
  assert.deepEqual(payload.ids, bindingIds(channel))
  assert.ok(Number.isInteger(payload.ids[0]))
  assert.equal(payload.data.type, 'INSERT')
  assert.deepEqual(payload.data.record, record)
  assert.equal(payload.data.errors, null)
  assert.ok(!('old_record' in payload.data), `an INSERT carries no old_record: ${JSON.stringify(payload.data)}`)
  assert.deepEqual(payload.data.columns, [
    { name: 'id', type: 'int8' },
    { name: 'title', type: 'text' },
    { name: 'n', type: 'int4' },
    { name: 'done', type: 'bool' },
    { name: 'meta', type: 'jsonb' },
    { name: 'tags', type: '_text' },
    { name: 'note', type: 'text' },
  ])
})

test('an INSERT binding gets nothing for an UPDATE of the same table', async (t) => {
  const s = new Scenario(t)
  const table = await createTable(t)
  const { channel, boxes } = await channelFor(s, 'listener', [{ event: 'INSERT', schema: 'public', table }])
  await subscribeChanges(s, channel)

  await sql(
    `INSERT INTO public.${table} (id, title) VALUES (1, 'a')`,
    `UPDATE public.${table} SET title = 'b' WHERE id = 1`,
    `INSERT INTO public.${table} (id, title) VALUES (2, 'c')`
  )
  await boxes[0].waitFor((p) => p.new.id === 2, WAIT_MS, 'the second INSERT')
  await sleep(QUIET_MS)

  assert.deepEqual(
    boxes[0].items.map((p) => [p.eventType, p.new.id]),
    [
      ['INSERT', 1],
      ['INSERT', 2],
    ]
  )
})

test('INSERT and * bindings on one channel share one frame whose ids hold both', async (t) => {
  const s = new Scenario(t)
  const table = await createTable(t)
  const { client, channel, boxes } = await channelFor(s, 'listener', [
    { event: 'INSERT', schema: 'public', table },
    { event: '*', schema: 'public', table },
  ])
  await subscribeChanges(s, channel)
  const [insertId, allId] = bindingIds(channel)
  assert.notEqual(insertId, allId)

  await sql(`INSERT INTO public.${table} (id) VALUES (1)`)
  await boxes[0].waitFor((p) => p.new.id === 1, WAIT_MS, 'the INSERT on the INSERT binding')
  await boxes[1].waitFor((p) => p.new.id === 1, WAIT_MS, 'the INSERT on the * binding')
  await sleep(QUIET_MS)

  const frames = rawChanges(s, client, channel)
  assert.equal(frames.length, 1, s.error(`expected one frame, got ${frames.length}`).message)
  assert.deepEqual([...frames[0][4].ids].sort(), [insertId, allId].sort())
  assert.equal(boxes[0].items.length, 1)
  assert.equal(boxes[1].items.length, 1)
})

test('two channels on one table each get a frame with only their own ids', async (t) => {
  const s = new Scenario(t)
  const table = await createTable(t)
  const client = s.client('both')
  const first = client.channel(uniqueTopic('db'))
  const second = client.channel(uniqueTopic('db'))
  const firstBox = changes(s, first, { event: 'INSERT', schema: 'public', table })
  const secondBox = changes(s, second, { event: '*', schema: 'public', table, filter: 'id=gte.1' })
  const other = s.client('other')
  const third = other.channel(uniqueTopic('db'))
  const thirdBox = changes(s, third, { event: '*', schema: 'public', table })
  await Promise.all([subscribeChanges(s, first), subscribeChanges(s, second), subscribeChanges(s, third)])

  await sql(`INSERT INTO public.${table} (id) VALUES (1)`)
  for (const box of [firstBox, secondBox, thirdBox]) {
    await box.waitFor((p) => p.new.id === 1, WAIT_MS, 'the INSERT')
  }
  await sleep(QUIET_MS)

  for (const [owner, channel] of [
    [client, first],
    [client, second],
    [other, third],
  ]) {
    const frames = rawChanges(s, owner, channel)
    assert.equal(frames.length, 1, s.error(`${channel.topic}: expected one frame, got ${frames.length}`).message)
    assert.deepEqual(frames[0][4].ids, bindingIds(channel))
  }
  assert.equal(firstBox.items.length + secondBox.items.length + thirdBox.items.length, 3)
})

test('UPDATE old values: the key only under DEFAULT identity, every column under FULL', async (t) => {
  const s = new Scenario(t)
  const plain = await createTable(t)
  const full = await createTable(t, TODO_COLUMNS, { identity: 'FULL' })
  const { channel, boxes } = await channelFor(s, 'listener', [
    { event: 'UPDATE', schema: 'public', table: plain },
    { event: 'UPDATE', schema: 'public', table: full },
  ])
  await subscribeChanges(s, channel)

  await sql(
    `INSERT INTO public.${plain} (id, title, n) VALUES (1, 'a', 1)`,
    `INSERT INTO public.${full} (id, title, n, tags) VALUES (1, 'a', 1, '{p}')`,
    `UPDATE public.${plain} SET title = 'b', n = 2 WHERE id = 1`,
    `UPDATE public.${full} SET title = 'b', n = 2 WHERE id = 1`
  )
  const defaultUpdate = await boxes[0].waitFor((p) => p.table === plain, WAIT_MS, 'the DEFAULT identity UPDATE')
  const fullUpdate = await boxes[1].waitFor((p) => p.table === full, WAIT_MS, 'the FULL identity UPDATE')

  assert.deepEqual(defaultUpdate.old, { id: 1 })
  assert.deepEqual(fullUpdate.old, { id: 1, title: 'a', n: 1, done: null, meta: null, tags: ['p'], note: null })
  assert.deepEqual(fullUpdate.new, { id: 1, title: 'b', n: 2, done: null, meta: null, tags: ['p'], note: null })
})

test('a DELETE carries old_record and no record', async (t) => {
  const s = new Scenario(t)
  const table = await createTable(t)
  const { client, channel, boxes } = await channelFor(s, 'listener', [{ event: 'DELETE', schema: 'public', table }])
  await subscribeChanges(s, channel)

  await sql(`INSERT INTO public.${table} (id, title) VALUES (3, 'gone')`, `DELETE FROM public.${table} WHERE id = 3`)
  const got = await boxes[0].waitFor(() => true, WAIT_MS, 'the DELETE')

  assert.equal(got.eventType, 'DELETE')
  assert.deepEqual(got.new, {})
  assert.deepEqual(got.old, { id: 3 })
  const [frame] = rawChanges(s, client, channel)
  assert.deepEqual(frame[4].data.old_record, { id: 3 })
  assert.ok(!('record' in frame[4].data), `a DELETE carries no record: ${JSON.stringify(frame[4].data)}`)
})

test('eq and in filters deliver only the matching rows', async (t) => {
  const s = new Scenario(t)
  const table = await createTable(t)
  const { channel, boxes } = await channelFor(s, 'listener', [
    { event: 'INSERT', schema: 'public', table, filter: 'id=eq.5' },
    { event: 'INSERT', schema: 'public', table, filter: 'title=in.(a,b)' },
  ])
  await subscribeChanges(s, channel)

  await sql(
    `INSERT INTO public.${table} (id, title) VALUES (4, 'c')`,
    `INSERT INTO public.${table} (id, title) VALUES (6, 'a')`,
    `INSERT INTO public.${table} (id, title) VALUES (7, 'b')`,
    `INSERT INTO public.${table} (id, title) VALUES (5, 'z')`
  )
  await boxes[0].waitFor((p) => p.new.id === 5, WAIT_MS, 'id 5')
  await boxes[1].waitFor((p) => p.new.id === 7, WAIT_MS, "title 'b'")
  await sleep(QUIET_MS)

  assert.deepEqual(boxes[0].items.map((p) => p.new.id), [5])
  assert.deepEqual(boxes[1].items.map((p) => p.new.title), ['a', 'b'])
})

test('comma-joined conditions all hold, and not. negates', async (t) => {
  const s = new Scenario(t)
  const table = await createTable(t)
  const { channel, boxes } = await channelFor(s, 'listener', [
    { event: 'INSERT', schema: 'public', table, filter: 'id=gt.0,id=lt.10' },
    { event: 'INSERT', schema: 'public', table, filter: 'title=not.eq.skip' },
  ])
  await subscribeChanges(s, channel)

  await sql(
    `INSERT INTO public.${table} (id, title) VALUES (20, 'skip')`,
    `INSERT INTO public.${table} (id, title) VALUES (21, 'keep')`,
    `INSERT INTO public.${table} (id, title) VALUES (5, 'skip')`
  )
  await boxes[0].waitFor((p) => p.new.id === 5, WAIT_MS, 'id 5')
  await boxes[1].waitFor((p) => p.new.id === 21, WAIT_MS, "title 'keep'")
  await sleep(QUIET_MS)

  assert.deepEqual(boxes[0].items.map((p) => p.new.id), [5])
  assert.deepEqual(boxes[1].items.map((p) => p.new.title), ['keep'])
})

test('like, ilike, match, imatch, is.null and isdistinct each deliver matches and skip the rest', async (t) => {
  const s = new Scenario(t)
  const table = await createTable(t)
  const cases = [
    ['title=like.ab%', [1]],
    ['title=ilike.AB%', [1, 2]],
    ['title=match.^x[0-9]+$', [3]],
    ['title=imatch.^X[0-9]+$', [3, 4]],
    ['title=is.null', [5]],
    ['title=isdistinct.zz', [1, 2, 3, 4, 5, 7]],
  ]
  const client = s.client('listener')
  const channels = cases.map(([filter, expected]) => {
    const channel = client.channel(uniqueTopic('db'))
    const box = changes(s, channel, { event: 'INSERT', schema: 'public', table, filter })
    return { filter, expected, channel, box }
  })
  await Promise.all(channels.map(({ channel }) => subscribeChanges(s, channel)))

  await sql(
    ...[
      [1, "'abc'"],
      [2, "'ABD'"],
      [3, "'x12'"],
      [4, "'X34'"],
      [5, 'NULL'],
      [6, "'zz'"],
      [7, "'qq'"],
    ].map(([id, title]) => `INSERT INTO public.${table} (id, title) VALUES (${id}, ${title})`)
  )
  for (const { filter, expected, box } of channels) {
    await box.waitFor((p) => p.new.id === expected.at(-1), WAIT_MS, `id ${expected.at(-1)} for ${filter}`)
  }
  await sleep(QUIET_MS)

  for (const { filter, expected, box } of channels) {
    assert.deepEqual(box.items.map((p) => p.new.id), expected, `filter ${filter}`)
  }
})

test('a double-quoted filter value matches a literal comma', async (t) => {
  const s = new Scenario(t)
  const table = await createTable(t)
  const { channel, boxes } = await channelFor(s, 'listener', [
    { event: 'INSERT', schema: 'public', table, filter: 'title=eq."a,b"' },
  ])
  await subscribeChanges(s, channel)

  await sql(
    `INSERT INTO public.${table} (id, title) VALUES (1, 'a')`,
    `INSERT INTO public.${table} (id, title) VALUES (2, 'b')`,
    `INSERT INTO public.${table} (id, title) VALUES (3, 'a,b')`
  )
  await boxes[0].waitFor((p) => p.new.id === 3, WAIT_MS, "title 'a,b'")
  await sleep(QUIET_MS)

  assert.deepEqual(boxes[0].items.map((p) => p.new.title), ['a,b'])
})

test('a DELETE filtered on a non-key column: skipped under DEFAULT identity, matched under FULL', async (t) => {
  const s = new Scenario(t)
  const plain = await createTable(t)
  const full = await createTable(t, TODO_COLUMNS, { identity: 'FULL' })
  const { channel, boxes } = await channelFor(s, 'listener', [
    { event: 'DELETE', schema: 'public', table: plain, filter: 'title=eq.x' },
    { event: 'DELETE', schema: 'public', table: plain },
    { event: 'DELETE', schema: 'public', table: full, filter: 'title=eq.x' },
  ])
  await subscribeChanges(s, channel)

  await sql(
    `INSERT INTO public.${plain} (id, title) VALUES (1, 'x')`,
    `INSERT INTO public.${full} (id, title) VALUES (1, 'y'), (2, 'x')`,
    `DELETE FROM public.${plain} WHERE id = 1`,
    `DELETE FROM public.${full} WHERE id = 1`,
    `DELETE FROM public.${full} WHERE id = 2`
  )
  await boxes[1].waitFor((p) => p.old.id === 1, WAIT_MS, 'the unfiltered DELETE')
  const matched = await boxes[2].waitFor((p) => p.old.id === 2, WAIT_MS, 'the FULL identity DELETE of x')
  await sleep(QUIET_MS)

  assert.deepEqual(boxes[0].items, [], 'DEFAULT identity has no old title to match')
  assert.deepEqual(matched.old, { id: 2, title: 'x', n: null, done: null, meta: null, tags: null, note: null })
  assert.deepEqual(boxes[2].items.map((p) => p.old.id), [2])
})

test('filter errors arrive as system errors and leave the channel joined', async (t) => {
  const s = new Scenario(t)
  const table = await createTable(t)
  const tooMany = `id=in.(${Array.from({ length: 101 }, (_, i) => i).join(',')})`
  const cases = [
    ['wrong', (m) => m === 'Error parsing `filter` params: ["wrong"]'],
    ['id=foo.1', (m) => m === 'Error parsing `filter` params: ["foo", "1"]'],
    ['id=in.1,2', (m) => m.includes('`in` filter value must be wrapped by parentheses')],
    [tooMany, (m) => m.includes('too many values for `in` filter. Maximum 100')],
    ['nope=eq.1', (m) => m.includes('invalid column for filter')],
  ]
  const client = s.client('listener')
  for (const [filter, check] of cases) {
    const channel = client.channel(uniqueTopic('bad'))
    const box = changes(s, channel, { event: '*', schema: 'public', table, filter })
    const error = await subscribeError(s, channel)
    assert.ok(check(error.message), s.error(`filter ${filter.slice(0, 40)}: unexpected message ${error.message}`).message)
    await sleep(QUIET_MS)
    assert.equal(channel.state, 'joined', s.error(`filter ${filter.slice(0, 40)}: channel ${channel.state}`).message)
    assert.deepEqual(channel.statuses, ['SUBSCRIBED'])
    await sql(`INSERT INTO public.${table} (id) VALUES (${cases.findIndex(([f]) => f === filter) + 1})`)
    await sleep(QUIET_MS)
    assert.deepEqual(box.items, [], `filter ${filter.slice(0, 40)}: no subscription, no change`)
  }
})

test('a table outside the publication gives a system error', async (t) => {
  const s = new Scenario(t)
  const table = await createTable(t, TODO_COLUMNS, { publish: false })
  const { channel } = await channelFor(s, 'listener', [{ event: '*', schema: 'public', table }])

  const error = await subscribeError(s, channel)

  assert.ok(error.message.startsWith(NOT_PUBLISHED), s.error(`unexpected message ${error.message}`).message)
  assert.equal(channel.state, 'joined')
})

test('a binding with neither schema nor table gives "No subscription params provided"', async (t) => {
  const s = new Scenario(t)
  const { channel } = await channelFor(s, 'listener', [{ event: '*' }])

  const error = await subscribeError(s, channel)

  assert.ok(
    error.message.startsWith('No subscription params provided'),
    s.error(`unexpected message ${error.message}`).message
  )
  assert.equal(channel.state, 'joined')
})

test('schema "public" alone receives changes from every published public table', async (t) => {
  const s = new Scenario(t)
  const first = await createTable(t)
  const second = await createTable(t, 'id int PRIMARY KEY, label text')
  const { channel, boxes } = await channelFor(s, 'listener', [{ event: '*', schema: 'public' }])
  await subscribeChanges(s, channel)

  await sql(
    `INSERT INTO public.${first} (id, title) VALUES (1, 'one')`,
    `INSERT INTO public.${second} (id, label) VALUES (2, 'two')`,
    `UPDATE public.${second} SET label = 'three' WHERE id = 2`
  )
  const one = await boxes[0].waitFor((p) => p.table === first, WAIT_MS, `the INSERT into ${first}`)
  const two = await boxes[0].waitFor((p) => p.table === second && p.eventType === 'UPDATE', WAIT_MS, `the UPDATE of ${second}`)

  assert.equal(one.eventType, 'INSERT')
  assert.equal(one.new.title, 'one')
  assert.deepEqual(two.new, { id: 2, label: 'three' })
  assert.deepEqual(
    boxes[0].items.filter((p) => p.table === second).map((p) => p.eventType),
    ['INSERT', 'UPDATE']
  )
})

test('TRUNCATE delivers nothing', async (t) => {
  const s = new Scenario(t)
  const table = await createTable(t)
  const { channel, boxes } = await channelFor(s, 'listener', [{ event: '*', schema: 'public', table }])
  await subscribeChanges(s, channel)

  await sql(
    `INSERT INTO public.${table} (id) VALUES (1)`,
    `TRUNCATE public.${table}`,
    `INSERT INTO public.${table} (id) VALUES (2)`
  )
  await boxes[0].waitFor((p) => p.new.id === 2, WAIT_MS, 'the INSERT after the TRUNCATE')
  await sleep(QUIET_MS)

  assert.deepEqual(
    boxes[0].items.map((p) => [p.eventType, p.new.id]),
    [
      ['INSERT', 1],
      ['INSERT', 2],
    ]
  )
})

test('a table without a primary key gets the 400 error event with an empty record', async (t) => {
  const s = new Scenario(t)
  const table = await createTable(t, 'id int, title text')
  const { client, channel, boxes } = await channelFor(s, 'listener', [{ event: '*', schema: 'public', table }])
  await subscribeChanges(s, channel)

  await sql(`INSERT INTO public.${table} (id, title) VALUES (1, 'a')`)
  const got = await boxes[0].waitFor(() => true, WAIT_MS, 'the error event')

  assert.equal(got.eventType, 'INSERT')
  assert.deepEqual(got.errors, [NO_PRIMARY_KEY])
  assert.deepEqual(got.new, {})
  const [frame] = rawChanges(s, client, channel)
  assert.deepEqual(frame[4].data, {
    schema: 'public',
    table,
    type: 'INSERT',
    columns: [],
    commit_timestamp: null,
    record: {},
    errors: [NO_PRIMARY_KEY],
  })
})

test('after leaving a channel its inserts produce no frames', async (t) => {
  const s = new Scenario(t)
  const table = await createTable(t)
  const client = s.client('listener')
  const leaving = client.channel(uniqueTopic('db'))
  const staying = client.channel(uniqueTopic('db'))
  const leavingBox = changes(s, leaving, { event: '*', schema: 'public', table })
  const stayingBox = changes(s, staying, { event: '*', schema: 'public', table })
  await Promise.all([subscribeChanges(s, leaving), subscribeChanges(s, staying)])

  await sql(`INSERT INTO public.${table} (id) VALUES (1)`)
  await leavingBox.waitFor((p) => p.new.id === 1, WAIT_MS, 'the INSERT before leaving')
  assert.equal(await s.within(leaving.unsubscribe(), WAIT_MS, 'the leave'), 'ok')
  await sql(`INSERT INTO public.${table} (id) VALUES (2)`)
  await stayingBox.waitFor((p) => p.new.id === 2, WAIT_MS, 'the INSERT after leaving')
  await sleep(QUIET_MS)

  assert.deepEqual(leavingBox.items.map((p) => p.new.id), [1])
  assert.equal(rawChanges(s, client, leaving).length, 1, s.error('a frame for the left channel').message)
})

test('supabase-js callbacks get eventType, new and old for an UPDATE', async (t) => {
  const s = new Scenario(t)
  const table = await createTable(t)
  const { channel, boxes } = await channelFor(s, 'listener', [{ event: 'UPDATE', schema: 'public', table }])
  await subscribeChanges(s, channel)

  await sql(
    `INSERT INTO public.${table} (id, title, done, tags) VALUES (9, 'before', false, '{a}')`,
    `UPDATE public.${table} SET title = 'after', done = true, meta = '{"v": 2}' WHERE id = 9`
  )
  const got = await boxes[0].waitFor(() => true, WAIT_MS, 'the UPDATE')

  assert.deepEqual(Object.keys(got).sort(), ['commit_timestamp', 'errors', 'eventType', 'new', 'old', 'schema', 'table'])
  assert.equal(got.eventType, 'UPDATE')
  assert.deepEqual(got.new, { id: 9, title: 'after', n: null, done: true, meta: { v: 2 }, tags: ['a'], note: null })
  assert.deepEqual(got.old, { id: 9 })
  assert.equal(got.errors, null)
  assert.match(got.commit_timestamp, TIMESTAMP)
})

test('realtime.setAuth(newToken) on a channel with bindings resubscribes: "Subscribed to PostgreSQL" again', async (t) => {
  const s = new Scenario(t)
  const table = await createTable(t)
  const { client, channel, boxes } = await channelFor(s, 'listener', [{ event: 'INSERT', schema: 'public', table }])
  const system = await subscribeChanges(s, channel)
  await sleep(QUIET_MS)
  const subscribed = (m) => m.extension === 'postgres_changes' && m.message === SUBSCRIBED && m.status === 'ok'
  assert.equal(system.count(subscribed), 1)

  await client.realtime.setAuth(mintToken({ role: 'authenticated', sub: 'user-1', expIn: 3600 }))
  await system.waitFor(() => system.count(subscribed) >= 2, WAIT_MS, 'a second "Subscribed to PostgreSQL"')

  await sql(`INSERT INTO public.${table} (id) VALUES (1)`)
  await boxes[0].waitFor((p) => p.new.id === 1, WAIT_MS, 'an INSERT after the refresh')
  await sleep(QUIET_MS)
  assert.deepEqual(system.items.filter((m) => m.status === 'error'), [])
  assert.equal(channel.state, 'joined')
  assert.equal(boxes[0].items.length, 1)
})
