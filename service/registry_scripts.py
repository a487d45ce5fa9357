"""The registry's Lua scripts. Each runs atomically in Redis, so commit and delete never interleave.

They build key names from the prefix in ARGV[1] (layout in service/registry.py), so they need a single
Redis node, not a cluster.
"""

COMMIT = """
local p, name, uid, if_absent = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
local fields = cjson.decode(ARGV[4])
local shas = {}
for i = 6, #ARGV do shas[#shas + 1] = ARGV[i] end
-- check everything before writing anything: a failed script must leave no trace
if if_absent == '1' then
  local latest = redis.call('ZRANGE', p .. 'versions:' .. name, -1, -1)
  if #latest > 0 then return {-2, latest[1]} end
end
for _, sha in ipairs(shas) do
  if redis.call('EXISTS', p .. 'pending:' .. uid .. ':' .. sha) == 0
     and redis.call('EXISTS', p .. 'blob:' .. sha) == 0 then
    return {-1, sha}
  end
end
local version = redis.call('INCR', p .. 'seq:' .. name)
local member = name .. '@' .. version
for _, sha in ipairs(shas) do
  local pending, blob = p .. 'pending:' .. uid .. ':' .. sha, p .. 'blob:' .. sha
  if redis.call('EXISTS', pending) == 1 then
    if redis.call('EXISTS', blob) == 1 then
      redis.call('DEL', pending)
    else
      redis.call('RENAME', pending, blob)
      redis.call('PERSIST', blob)
    end
  end
  redis.call('SADD', p .. 'refs:' .. sha, member)
end
local rec = p .. 'rec:' .. name .. ':' .. version
redis.call('HSET', rec, 'version', version, unpack(fields))
redis.call('ZADD', p .. 'versions:' .. name, version, version)
redis.call('ZADD', p .. 'names', 0, name)
redis.call('PUBLISH', p .. 'events', cjson.encode({op = 'put', name = name, version = version,
  sha256 = redis.call('HGET', rec, 'sha256')}))
return {version}
"""

DELETE = """
local p, name = ARGV[1], ARGV[2]
local vkey = p .. 'versions:' .. name
local versions = redis.call('ZRANGE', vkey, 0, -1)
if #versions == 0 then return {} end
for _, v in ipairs(versions) do
  local rec = p .. 'rec:' .. name .. ':' .. v
  local chunks = redis.call('HGET', rec, 'chunks') or ''
  for sha in string.gmatch(chunks, '%S+') do
    local refs = p .. 'refs:' .. sha
    redis.call('SREM', refs, name .. '@' .. v)
    if redis.call('SCARD', refs) == 0 then redis.call('DEL', p .. 'blob:' .. sha) end
  end
  redis.call('DEL', rec)
end
redis.call('DEL', vkey)  -- seq:<name> stays, so name@1 never names other bytes after a re-upload
redis.call('ZREM', p .. 'names', name)
local numbers = {}
for i, v in ipairs(versions) do numbers[i] = tonumber(v) end
redis.call('PUBLISH', p .. 'events', cjson.encode({op = 'delete', name = name,
  version = numbers[#numbers], versions = numbers}))
return versions
"""

# HGETALL of one version (the latest when ARGV[3] is empty); empty when there is none.
RECORD = """
local p, name, version = ARGV[1], ARGV[2], ARGV[3]
if version == '' then
  version = redis.call('ZRANGE', p .. 'versions:' .. name, -1, -1)[1]
  if not version then return {} end
end
return redis.call('HGETALL', p .. 'rec:' .. name .. ':' .. version)
"""

# "<version>:<sha256>" of one version (the latest when ARGV[3] is empty); nil when there is none.
STAMP = """
local p, name, version = ARGV[1], ARGV[2], ARGV[3]
if version == '' then
  version = redis.call('ZRANGE', p .. 'versions:' .. name, -1, -1)[1]
  if not version then return false end
end
local sha = redis.call('HGET', p .. 'rec:' .. name .. ':' .. version, 'sha256')
if not sha then return false end
return version .. ':' .. sha
"""
