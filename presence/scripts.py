"""The Lua scripts of the presence store, as text; ``presence.store`` runs them.

Every write that spans several keys is one script, so that concurrent
processes never see half an entry. Each script's comment names its KEYS and
ARGV in order and what it returns; key names come from ``presence.keys``.
Scripts that stamp a deadline read the Redis clock (``TIME``), so that every
process compares against the same clock.
"""

from __future__ import annotations

from typing import Final

# KEYS: alive, processes
# ARGV: process_id, liveness_ms
# Returns 1 if the liveness key still existed, else 0.
LIVENESS: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
return existed
"""

# KEYS: alive, processes, owned, channels, member, index, old_member
# ARGV: process_id, liveness_ms, entry_ttl_ms, channel, old_field, old_ref,
#       field, ref, entry_if_joined, entry_if_updated, signature
# Returns {kind, old entry JSON or ''}.
TRACK: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
local old = false
if ARGV[5] ~= '' then
  old = redis.call('HGET', KEYS[7], ARGV[5])
  if old and KEYS[7] == KEYS[5] and cjson.decode(old)['sig'] == ARGV[11] then
    redis.call('SADD', KEYS[6], KEYS[5])
    redis.call('SADD', KEYS[4], ARGV[4])
    redis.call('SADD', KEYS[3], ARGV[6])
    redis.call('PEXPIRE', KEYS[5], ARGV[3])
    redis.call('PEXPIRE', KEYS[6], ARGV[3])
    return {'unchanged', old}
  end
  redis.call('SREM', KEYS[3], ARGV[6])
  if old then
    redis.call('HDEL', KEYS[7], ARGV[5])
    if redis.call('EXISTS', KEYS[7]) == 0 then
      redis.call('SREM', KEYS[6], KEYS[7])
    end
  end
end
local entry = ARGV[9]
if old then entry = ARGV[10] end
redis.call('HSET', KEYS[5], ARGV[7], entry)
redis.call('SADD', KEYS[6], KEYS[5])
redis.call('SADD', KEYS[4], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[8])
redis.call('PEXPIRE', KEYS[5], ARGV[3])
redis.call('PEXPIRE', KEYS[6], ARGV[3])
if old then return {'updated', old} end
return {'joined', ''}
"""

# KEYS: member, index, channels, owned
# ARGV: field, ref, channel
# Returns the removed entry JSON, or nil if it was already gone.
REMOVE: Final = """
redis.call('SREM', KEYS[4], ARGV[2])
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], KEYS[1]) end
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SREM', KEYS[3], ARGV[3]) end
return entry
"""

# KEYS: member_1, index_1, member_2, index_2, ...
# ARGV: entry_ttl_ms, field_1, field_2, ...
# Returns the 1-based positions of the fields that no longer exist.
REFRESH: Final = """
local missing = {}
for i = 2, #ARGV do
  local member = KEYS[2 * i - 3]
  local index = KEYS[2 * i - 2]
  if redis.call('HEXISTS', member, ARGV[i]) == 1 then
    redis.call('PEXPIRE', member, ARGV[1])
    redis.call('PEXPIRE', index, ARGV[1])
  else
    missing[#missing + 1] = i - 1
  end
end
return missing
"""

# KEYS: owned, channels, member_1, index_1, member_2, index_2, ...
# ARGV: entry_ttl_ms, field_1, ref_1, channel_1, entry_1, field_2, ...
# Writes back the entries that are missing (swept); returns the 1-based positions of those it wrote.
RESTORE: Final = """
local restored = {}
for i = 1, (#ARGV - 1) / 4 do
  local member = KEYS[1 + 2 * i]
  local index = KEYS[2 + 2 * i]
  local field = ARGV[4 * i - 2]
  if redis.call('HEXISTS', member, field) == 0 then
    redis.call('HSET', member, field, ARGV[4 * i + 1])
    redis.call('SADD', index, member)
    redis.call('SADD', KEYS[2], ARGV[4 * i])
    redis.call('SADD', KEYS[1], ARGV[4 * i - 1])
    restored[#restored + 1] = i
  end
  redis.call('PEXPIRE', member, ARGV[1])
  redis.call('PEXPIRE', index, ARGV[1])
end
return restored
"""

# KEYS: processes
# Returns the ids of processes whose liveness deadline has passed.
CANDIDATES: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
"""

# KEYS: alive, owned, processes, channels, member_1, index_1, member_2, index_2, ...
# ARGV: process_id, field_1, ref_1, channel_1, field_2, ref_2, channel_2, ...
# Returns nil if the process is alive, else the entry JSONs this call removed.
SWEEP: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local removed = {}
for i = 1, (#ARGV - 1) / 3 do
  local member = KEYS[3 + 2 * i]
  local index = KEYS[4 + 2 * i]
  local field = ARGV[3 * i - 1]
  redis.call('SREM', KEYS[2], ARGV[3 * i])
  local entry = redis.call('HGET', member, field)
  if entry then
    redis.call('HDEL', member, field)
    removed[#removed + 1] = entry
    if redis.call('EXISTS', member) == 0 then redis.call('SREM', index, member) end
    if redis.call('EXISTS', index) == 0 then redis.call('SREM', KEYS[4], ARGV[3 * i + 1]) end
  end
end
if redis.call('SCARD', KEYS[2]) == 0 then redis.call('ZREM', KEYS[3], ARGV[1]) end
return removed
"""

# KEYS: index, channels, member_1, member_2, ...
# ARGV: channel
PRUNE: Final = """
for i = 3, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then redis.call('SREM', KEYS[1], KEYS[i]) end
end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[1]) end
return 0
"""
