/**
 * Shared plumbing for the supabase-js end-to-end files: environment, tokens,
 * clients with a frame-tracing transport, subscribe/wait helpers and cleanup.
 *
 * Node 20 has no global WebSocket (realtime-js 2.119 only finds one on Node 22+),
 * so every client is given `ws` as its `transport`.
 */
import { execFile } from 'node:child_process'
import { createHmac, randomUUID } from 'node:crypto'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { setTimeout as sleep } from 'node:timers/promises'
import { createClient } from '@supabase/supabase-js'
import WebSocket from 'ws'

export { sleep }

/** Upper bound for any single wait on the server. */
export const WAIT_MS = 10_000
/** How long to keep listening after a control message to prove that something did not arrive. */
export const QUIET_MS = 500

function requireEnv(name) {
  const value = process.env[name]
  if (!value) {
    throw new Error(`environment variable ${name} is required`)
  }
  return value
}

export const SUPABASE_URL = requireEnv('SUPABASE_URL')
export const ANON_KEY = requireEnv('ANON_KEY')
export const SERVICE_KEY = requireEnv('SERVICE_KEY')
export const JWT_SECRET = requireEnv('JWT_SECRET')

/**
 * Mint an HS256 JWT. `expIn` is seconds from now (negative: already expired,
 * null: no `exp` claim); `role: null` omits the role.
 */
export function mintToken({ role = 'anon', expIn = 3600, secret = JWT_SECRET, ...claims } = {}) {
  const now = Math.floor(Date.now() / 1000)
  const body = { iat: now - 1 }
  if (role !== null) body.role = role
  if (expIn !== null) body.exp = now + expIn
  Object.assign(body, claims)
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString('base64url')
  const signingInput = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(body)}`
  const signature = createHmac('sha256', secret).update(signingInput).digest('base64url')
  return `${signingInput}.${signature}`
}

const SQL_SCRIPT = fileURLToPath(new URL('../sql.py', import.meta.url))
const execFileAsync = promisify(execFile)

/**
 * Run SQL statements through tests/e2e/sql.py (Python `PYTHON`, database
 * `PG_URL`), each in its own transaction; resolves with the rows of the last
 * statement that returned any.
 */
export async function sql(...statements) {
  const python = requireEnv('PYTHON')
  requireEnv('PG_URL')
  try {
    const { stdout } = await execFileAsync(python, [SQL_SCRIPT, ...statements], { maxBuffer: 64 * 1024 * 1024 })
    return JSON.parse(stdout)
  } catch (error) {
    throw new Error(`SQL failed: ${statements.join('; ').slice(0, 400)}\n${error.stderr ?? error.message}`)
  }
}

/** A sub-topic unique to one test, so parallel or repeated runs never share a room. */
export function uniqueTopic(prefix = 'room') {
  return `${prefix}-${randomUUID().slice(0, 8)}`
}

export function bytesOf(buffer) {
  return Array.from(new Uint8Array(buffer))
}

function describeFrame(data) {
  if (typeof data === 'string') {
    return data.length > 400 ? `${data.slice(0, 400)}…(${data.length} chars)` : data
  }
  const view = data instanceof ArrayBuffer ? new Uint8Array(data) : new Uint8Array(data.buffer ?? data)
  const head = Buffer.from(view.subarray(0, 200))
  const hex = head.toString('hex').replace(/(..)/g, '$1 ').trim()
  const text = head.toString('latin1').replace(/[^\x20-\x7e]/g, '.')
  const more = view.byteLength > 200 ? ' …' : ''
  return `<binary ${view.byteLength} bytes: ${hex}${more} | ${text}${more}>`
}

function redact(url) {
  return String(url).replace(/apikey=[^&]+/, 'apikey=<redacted>')
}

function tracingTransport(trace, received) {
  return class TracingWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols)
      const stamp = () => new Date().toISOString().slice(11, 23)
      trace.push(`${stamp()} connect ${redact(url)}`)
      this.addEventListener('open', () => trace.push(`${stamp()} open`))
      this.addEventListener('message', (event) => {
        received.push(typeof event.data === 'string' ? Buffer.from(event.data) : Buffer.from(event.data))
        trace.push(`${stamp()} <- ${describeFrame(event.data)}`)
      })
      this.addEventListener('error', (event) => trace.push(`${stamp()} error ${event.message ?? event}`))
      this.addEventListener('close', (event) => trace.push(`${stamp()} close ${event.code} ${event.reason}`))
      this._stamp = stamp
    }

    send(data, ...rest) {
      trace.push(`${this._stamp()} -> ${describeFrame(data)}`)
      return super.send(data, ...rest)
    }
  }
}

/**
 * One test's clients. Every client made here is closed in `t.after`, and every
 * failed wait reports the frames each client saw.
 */
export class Scenario {
  constructor(t) {
    this.t = t
    this.clients = []
    t.after(() => this.close())
  }

  /**
   * A supabase-js client. `realtime` options are passed to RealtimeClient
   * (e.g. `{vsn: '1.0.0'}`); other options go to createClient.
   */
  client(name, { key = ANON_KEY, realtime = {}, ...options } = {}) {
    const trace = []
    const received = []
    const client = createClient(SUPABASE_URL, key, {
      auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
      ...options,
      realtime: { transport: tracingTransport(trace, received), ...realtime },
    })
    this.clients.push({ name, client, trace, received })
    return client
  }

  traceOf(client) {
    const entry = this.clients.find((e) => e.client === client || e.client.realtime === client)
    return entry?.trace ?? []
  }

  /** Raw frames (text or binary) this client received that contain `text` as UTF-8 bytes. */
  framesContaining(client, text) {
    const entry = this.clients.find((e) => e.client === client || e.client.realtime === client)
    const needle = Buffer.from(text)
    return (entry?.received ?? []).filter((frame) => frame.includes(needle))
  }

  dump() {
    return this.clients
      .map(({ name, trace }) => `--- ${name} frames ---\n${trace.join('\n') || '(none)'}`)
      .join('\n')
  }

  error(message) {
    return new Error(`${message}\n${this.dump()}`)
  }

  /** Resolve with `promise`, or fail with the frame traces after `ms`. */
  async within(promise, ms, what) {
    let timer
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(this.error(`timed out after ${ms} ms waiting for ${what}`)), ms)
    })
    try {
      return await Promise.race([promise, timeout])
    } finally {
      clearTimeout(timer)
    }
  }

  /** Subscribe and resolve on SUBSCRIBED; any other first status fails. */
  subscribe(channel, ms = WAIT_MS) {
    const statuses = []
    channel.statuses = statuses
    const reached = new Promise((resolve, reject) => {
      channel.subscribe((status, err) => {
        statuses.push(err ? `${status}: ${err.message}` : status)
        if (status === 'SUBSCRIBED') {
          resolve(channel)
        } else {
          reject(this.error(`${channel.topic}: expected SUBSCRIBED, got ${statuses.join(' -> ')}`))
        }
      })
    })
    return this.within(reached, ms, `${channel.topic} SUBSCRIBED`)
  }

  /** Record the statuses of a subscription that is expected to fail. */
  watchStatuses(channel) {
    const statuses = []
    const waiters = []
    channel.subscribe((status, err) => {
      statuses.push({ status, message: err?.message })
      for (const waiter of waiters.splice(0)) waiter()
    })
    const next = (predicate, ms, what) =>
      this.within(
        new Promise((resolve) => {
          const check = () => {
            const hit = statuses.find(predicate)
            if (hit) resolve(hit)
            else waiters.push(check)
          }
          check()
        }),
        ms,
        what
      )
    return { statuses, next }
  }

  /** An inbox of broadcast payloads for `event` on `channel` (call before subscribing). */
  inbox(channel, event = '*', type = 'broadcast') {
    const box = new Inbox(this, `${channel.topic} ${type} ${event}`)
    channel.on(type, type === 'system' ? {} : { event }, box.push)
    return box
  }

  async close() {
    await Promise.all(
      this.clients.map(async ({ client }) => {
        let timer
        try {
          await Promise.race([
            client.removeAllChannels(),
            new Promise((resolve) => {
              timer = setTimeout(resolve, WAIT_MS + 2_000)
            }),
          ])
        } finally {
          clearTimeout(timer)
          await client.realtime.disconnect()
        }
      })
    )
  }
}

export class Inbox {
  constructor(scenario, label) {
    this.scenario = scenario
    this.label = label
    this.items = []
    this.waiters = []
    this.push = (message) => {
      this.items.push(message)
      for (const waiter of this.waiters.splice(0)) waiter()
    }
  }

  /** Resolve with the first message (already received or future) matching `predicate`. */
  waitFor(predicate = () => true, ms = WAIT_MS, what = 'a message') {
    const found = new Promise((resolve) => {
      const check = () => {
        const hit = this.items.find(predicate)
        if (hit) resolve(hit)
        else this.waiters.push(check)
      }
      check()
    })
    return this.scenario.within(found, ms, `${what} on ${this.label}`)
  }

  waitForEvent(event, ms = WAIT_MS) {
    return this.waitFor((message) => message.event === event, ms, `event "${event}"`)
  }

  count(predicate) {
    return this.items.filter(predicate).length
  }

  ofEvent(event) {
    return this.items.filter((message) => message.event === event)
  }
}
