/**
 * postgres_changes helpers shared by the end-to-end files: tables, inboxes
 * of one binding's callbacks, and subscribing until "Subscribed to PostgreSQL".
 */
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { Inbox, WAIT_MS, sql } from './helpers.mjs'

export const PUBLICATION = 'supabase_realtime'
export const SUBSCRIBED = 'Subscribed to PostgreSQL'
export const TODO_COLUMNS = 'id bigint PRIMARY KEY, title text, n int4, done bool, meta jsonb, tags text[], note text'

/**
 * A fresh `public` table readable by the API roles, in the publication unless
 * `publish` is false; dropped after the test.
 */
export async function createTable(t, columns = TODO_COLUMNS, { publish = true, identity = null } = {}) {
  const name = `pc_${randomUUID().replaceAll('-', '').slice(0, 12)}`
  const statements = [
    `CREATE TABLE public.${name} (${columns})`,
    `GRANT SELECT ON public.${name} TO anon, authenticated, service_role`,
  ]
  if (identity) statements.push(`ALTER TABLE public.${name} REPLICA IDENTITY ${identity}`)
  if (publish) statements.push(`ALTER PUBLICATION ${PUBLICATION} ADD TABLE public.${name}`)
  await sql(...statements)
  t.after(() => sql(`DROP TABLE IF EXISTS public.${name}`))
  return name
}

/** An inbox of the callback payloads of one `postgres_changes` binding (call before subscribing). */
export function changes(s, channel, binding) {
  const box = new Inbox(s, `${channel.topic} postgres_changes ${JSON.stringify(binding)}`)
  channel.on('postgres_changes', binding, box.push)
  return box
}

/** Subscribe, then wait for the channel's "Subscribed to PostgreSQL"; resolves with its system inbox. */
export async function subscribeChanges(s, channel) {
  const system = s.inbox(channel, '*', 'system')
  await s.subscribe(channel)
  const message = await system.waitFor((m) => m.extension === 'postgres_changes', WAIT_MS, 'the postgres_changes system message')
  assert.deepEqual(
    message,
    { message: SUBSCRIBED, status: 'ok', extension: 'postgres_changes', channel: channel.subTopic },
    s.error('expected "Subscribed to PostgreSQL"').message
  )
  return system
}
