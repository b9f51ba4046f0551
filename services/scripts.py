"""The store's Lua scripts. Each runs atomically on the keys of one job (one hash tag).

A Lua error half-way keeps the writes made before it, so every script checks first and writes
after. Fencing is by attempt number: an attempt may write for as long as no newer attempt has
claimed the job, even if its lease lapsed meanwhile (DESIGN §5).
"""

# Shared helpers, prepended to each script.
_HELPERS = """
local TERMINAL = {succeeded = true, failed = true, cancelled = true, diverged = true}

-- Status changes keep the hash, the status indexes (all jobs', and the job's tenant's) and
-- the job's event stream (which SSE readers tail) in step. The indexes sit outside the job's
-- hash tag: one Redis, not a cluster.
local function set_status(job, events, id, old, new)
  redis.call('HSET', job, 'status', new)
  if new == 'queued' then
    redis.call('HSET', job, 'queued_at', redis.call('TIME')[1])
  end
  redis.call('ZREM', 'gs:jobs:' .. old, id)
  redis.call('ZADD', 'gs:jobs:' .. new, 0, id)
  local tenant = redis.call('HGET', job, 'tenant')
  if tenant then
    redis.call('ZREM', 'gs:tenant:' .. tenant .. ':jobs:' .. old, id)
    redis.call('ZADD', 'gs:tenant:' .. tenant .. ':jobs:' .. new, 0, id)
  end
  redis.call('XADD', events, '*', 'status', new,
             'steps_done', redis.call('HGET', job, 'steps_done'))
end

-- The job's status if `attempt` still owns it and it has not finished, else nil.
local function owned_status(job, attempt)
  if redis.call('HGET', job, 'attempt') ~= attempt then return nil end
  local status = redis.call('HGET', job, 'status')
  if TERMINAL[status] then return nil end
  return status
end

-- A finished job needs neither its lease nor its checkpoint (keys of the same hash tag).
local function finish(job, events, id, old, new, now)
  local base = string.sub(job, 1, -4)  -- 'gs:{<id>}:' of 'gs:{<id>}:job'
  redis.call('DEL', base .. 'lease', base .. 'ckpt')
  redis.call('HSET', job, 'finished_at', now)
  set_status(job, events, id, old, new)
end

-- The attempt that the reaper requeued while it was paused is back, and no newer attempt
-- claimed the job: it takes the job back, and its lapse does not count as a lost attempt.
local function take_back(job, events, id)
  redis.call('HINCRBY', job, 'lost', -1)
  set_status(job, events, id, 'queued', 'running')
end

-- The attempt holding `job` lost its worker (its lease lapsed). Returns what happens next:
-- 'cancelled' (a cancel was pending), 'failed' (too many attempts lost) or 'requeue'.
local function lapse(job, events, id, status, max_attempts, now)
  local lost = redis.call('HINCRBY', job, 'lost', 1)
  local attempt = redis.call('HGET', job, 'attempt')
  local worker = redis.call('HGET', job, 'worker') or '?'
  if status == 'cancelling' then
    finish(job, events, id, status, 'cancelled', now)
    return 'cancelled'
  end
  if lost >= tonumber(max_attempts) then
    redis.call('HSET', job, 'error', 'worker lost ' .. lost .. ' time(s), last during attempt '
               .. attempt .. ' on ' .. worker .. '; max_attempts is ' .. max_attempts)
    finish(job, events, id, status, 'failed', now)
    return 'failed'
  end
  redis.call('HSET', job, 'route_reason',
             'requeued: attempt ' .. attempt .. ' lost its worker ' .. worker)
  return 'requeue'
end
"""

# KEYS: job, events, idempotency key (optional). ARGV: job id, idempotency TTL s, tenant, the
# tenant's limit of active jobs, then the record's field/value pairs. Returns {id, 1} for a new
# job, {id, 0} for the one the idempotency key already names, {'limit', n} when the tenant
# already has n >= limit jobs queued or running.
CREATE = (
    _HELPERS
    + """
if KEYS[3] then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {existing, 0} end
end
local tenant_jobs = 'gs:tenant:' .. ARGV[3] .. ':jobs'
local active = 0
for _, status in ipairs({'queued', 'running', 'cancelling'}) do
  active = active + redis.call('ZCARD', tenant_jobs .. ':' .. status)
end
if active >= tonumber(ARGV[4]) then return {'limit', active} end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('ZADD', 'gs:jobs', 0, ARGV[1])
redis.call('ZADD', 'gs:jobs:queued', 0, ARGV[1])
redis.call('ZADD', tenant_jobs, 0, ARGV[1])
redis.call('ZADD', tenant_jobs .. ':queued', 0, ARGV[1])
redis.call('HSET', KEYS[1], 'queued_at', redis.call('TIME')[1])
redis.call('XADD', KEYS[2], '*', 'status', 'queued', 'steps_done', 0)
if KEYS[3] then redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[2]) end
return {ARGV[1], 1}
"""
)

# KEYS: job, events, lease, ckpt. ARGV: job id, worker, now, lease ms, max attempts.
# Takes a queued job, or a running one whose lease lapsed, for a new attempt. Returns
# {'claimed', attempt, spec, checkpoint field/value pairs...} or {reason, status}.
CLAIM = (
    _HELPERS
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', ''} end
if TERMINAL[status] then return {'finished', status} end
if status ~= 'queued' then
  if redis.call('EXISTS', KEYS[3]) == 1 then return {'busy', status} end
  -- The lease lapsed and the reaper has not got to it yet: this delivery takes over.
  local next = lapse(KEYS[1], KEYS[2], ARGV[1], status, ARGV[5], ARGV[3])
  if next ~= 'requeue' then return {next, next} end
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('SET', KEYS[3], attempt, 'PX', ARGV[4])
redis.call('HSET', KEYS[1], 'worker', ARGV[2])
if redis.call('HEXISTS', KEYS[1], 'started_at') == 0 then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[3])
end
if status ~= 'running' then set_status(KEYS[1], KEYS[2], ARGV[1], status, 'running') end
local reply = {'claimed', tostring(attempt), redis.call('HGET', KEYS[1], 'spec')}
for _, v in ipairs(redis.call('HGETALL', KEYS[4])) do table.insert(reply, v) end
return reply
"""
)

# KEYS: job, steps, events, lease, ckpt. ARGV: job id, attempt, first step, entry id, now,
# finish status ('' to go on), result JSON, error, lease ms, checkpoint theta, checkpoint
# optimizer state, then the chunk's field/value pairs (none for a flush without steps).
# Appends the chunk, writes the checkpoint that matches its last step and renews the lease.
FLUSH = (
    _HELPERS
    + """
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[2] then return {'fenced'} end
local status = redis.call('HGET', KEYS[1], 'status')
local done = tonumber(redis.call('HGET', KEYS[1], 'steps_done'))
local chunk = #ARGV > 11
local last = chunk and tonumber(string.match(ARGV[4], '^(%d+)')) or -1
-- A retry of this very flush, whose reply was lost: it was applied already.
if (chunk and done == last + 1) or (not chunk and status == ARGV[6]) then
  if status == ARGV[6] then return {'finished'} end
  if status == 'cancelled' then return {'cancelled'} end
  if not TERMINAL[status] then return {'ok'} end
end
if TERMINAL[status] then return {'fenced'} end
if chunk then
  if tonumber(ARGV[3]) ~= done then return {'gap', tostring(done)} end
  redis.call('XADD', KEYS[2], ARGV[4], unpack(ARGV, 12))
  -- Service-wide counters for /metrics (outside the hash tag, like the indexes).
  redis.call('HINCRBY', 'gs:stats', 'steps', last + 1 - done)
  redis.call('HINCRBY', 'gs:stats', 'flushes', 1)
  done = last + 1
  redis.call('HSET', KEYS[1], 'steps_done', done)
  redis.call('HSET', KEYS[5], 'step', done, 'theta', ARGV[10], 'optimizer', ARGV[11])
end
if status == 'queued' then
  take_back(KEYS[1], KEYS[3], ARGV[1])
  status = 'running'
end
if ARGV[6] ~= '' then
  if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[7]) end
  if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[8]) end
  finish(KEYS[1], KEYS[3], ARGV[1], status, ARGV[6], ARGV[5])
  return {'finished'}
end
if status == 'cancelling' then
  finish(KEYS[1], KEYS[3], ARGV[1], status, 'cancelled', ARGV[5])
  return {'cancelled'}
end
redis.call('SET', KEYS[4], ARGV[2], 'PX', ARGV[9])
return {'ok'}
"""
)

# KEYS: job, events, lease. ARGV: job id, attempt, lease ms. 1 if the attempt still owns the job.
RENEW = (
    _HELPERS
    + """
local status = owned_status(KEYS[1], ARGV[2])
if not status then return 0 end
if status == 'queued' then take_back(KEYS[1], KEYS[2], ARGV[1]) end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
return 1
"""
)

# KEYS: job, events, lease. ARGV: job id, attempt, now, reason. An attempt hands its job back
# (its worker is shutting down): queued again, to resume from the checkpoint. Returns the
# job's queue, '' if it was cancelled instead, or nil if the attempt no longer owns the job.
RELEASE = (
    _HELPERS
    + """
local status = owned_status(KEYS[1], ARGV[2])
if not status then return false end
redis.call('DEL', KEYS[3])
if status == 'cancelling' then
  finish(KEYS[1], KEYS[2], ARGV[1], status, 'cancelled', ARGV[3])
  return ''
end
redis.call('HSET', KEYS[1], 'route_reason', ARGV[4])
if status ~= 'queued' then set_status(KEYS[1], KEYS[2], ARGV[1], status, 'queued') end
return redis.call('HGET', KEYS[1], 'queue')
"""
)

# KEYS: job, events, lease. ARGV: job id, now, max attempts. The reaper's check of one
# running job: if its lease lapsed, the job is requeued (or ends cancelled or failed).
# Returns the queue to send a new message to, or false.
REAP = (
    _HELPERS
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' and status ~= 'cancelling' then return false end
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
if lapse(KEYS[1], KEYS[2], ARGV[1], status, ARGV[3], ARGV[2]) ~= 'requeue' then return false end
set_status(KEYS[1], KEYS[2], ARGV[1], status, 'queued')
return redis.call('HGET', KEYS[1], 'queue')
"""
)

# KEYS: job, events. ARGV: job id, now.
CANCEL = (
    _HELPERS
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', ''} end
if status == 'queued' then
  finish(KEYS[1], KEYS[2], ARGV[1], status, 'cancelled', ARGV[2])
  return {'ok', 'cancelled'}
end
if status == 'running' then
  set_status(KEYS[1], KEYS[2], ARGV[1], status, 'cancelling')
  return {'ok', 'cancelling'}
end
if status == 'cancelling' then return {'ok', status} end
return {'finished', status}
"""
)

# KEYS: job, events. ARGV: job id, attempt, error, now.
FAIL = (
    _HELPERS
    + """
local status = owned_status(KEYS[1], ARGV[2])
if not status then return 0 end
redis.call('HSET', KEYS[1], 'error', ARGV[3])
finish(KEYS[1], KEYS[2], ARGV[1], status, 'failed', ARGV[4])
return 1
"""
)
