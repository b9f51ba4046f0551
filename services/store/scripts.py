"""The store's Lua scripts. Each runs atomically on the keys of one job (one hash tag).

Every per-job script takes the job's keys in the order `keys.job_keys` gives (job, steps,
events, lease, ckpt), and the names of the indexes come from services/store/keys.py, like the
terminal statuses from services/schemas.py: nothing is spelled twice.

A Lua error half-way keeps the writes made before it, so every script checks first and writes
after. Each script starts with a `#!lua` line, so a Redis over its `maxmemory` refuses a script
that may grow memory before it runs (nothing half-written); the few that must work on a full
Redis (hand-back, renew, cancel, fail, delete) are flagged `allow-oom`: they free memory or
change a few fields. Fencing is by attempt number: an attempt may write for as long as no
newer attempt has claimed the job and it has not handed the job back, even if its lease lapsed
meanwhile (DESIGN §5).
"""

from services.schemas import TERMINAL_STATUSES
from services.store import keys


def _lua_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# A job's record key around its id, as keys.job_key writes it.
_JOB_KEY_PREFIX, _JOB_KEY_SUFFIX = keys.job_key("\0").split("\0")
_TERMINAL = ", ".join(f"[{_lua_string(s.value)}] = true" for s in sorted(TERMINAL_STATUSES))

# Shared helpers, after each script's `#!lua` line.
_HELPERS = f"""
local TERMINAL = {{{_TERMINAL}}}
local JOBS_INDEX = {_lua_string(keys.JOBS_INDEX)}
local STATUS_INDEX = {_lua_string(keys.STATUS_INDEX_PREFIX)}
local TENANT_PREFIX = {_lua_string(keys.TENANT_PREFIX)}
local TENANT_JOBS = {_lua_string(keys.TENANT_JOBS)}
local STATS = {_lua_string(keys.STATS_KEY)}
local JOB_KEY_PREFIX = {_lua_string(_JOB_KEY_PREFIX)}
local JOB_KEY_SUFFIX = {_lua_string(_JOB_KEY_SUFFIX)}
local JOB, STEPS, EVENTS, LEASE, CKPT = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
"""

_HELPERS += """
local function job_key(id)
  return JOB_KEY_PREFIX .. id .. JOB_KEY_SUFFIX
end

local function tenant_index(tenant, status)
  local base = TENANT_PREFIX .. tenant .. TENANT_JOBS
  if status then return base .. ':' .. status end
  return base
end

local function tenant_storage(tenant)
  return TENANT_PREFIX .. tenant .. ':bytes'
end

-- Status changes keep the hash, the status indexes (all jobs', and the job's tenant's) and
-- the job's event stream (which SSE readers tail) in step. The indexes sit outside the job's
-- hash tag: one Redis, not a cluster.
local function set_status(id, old, new)
  redis.call('HSET', JOB, 'status', new)
  if new == 'queued' then
    redis.call('HSET', JOB, 'queued_at', redis.call('TIME')[1])
  end
  redis.call('ZREM', STATUS_INDEX .. old, id)
  redis.call('ZADD', STATUS_INDEX .. new, 0, id)
  local tenant = redis.call('HGET', JOB, 'tenant')
  if tenant then
    redis.call('ZREM', tenant_index(tenant, old), id)
    redis.call('ZADD', tenant_index(tenant, new), 0, id)
  end
  redis.call('XADD', EVENTS, '*', 'status', new,
             'steps_done', redis.call('HGET', JOB, 'steps_done'))
end

-- Whether `attempt` still owns the job: no newer attempt claimed it, and it did not hand the
-- job back (a hand-back ends its ownership for good, whatever its threads do after).
local function owns(attempt)
  return redis.call('HGET', JOB, 'attempt') == attempt
     and redis.call('HGET', JOB, 'released') ~= attempt
end

-- The job's status if `attempt` still owns it and it has not finished, else nil.
local function owned_status(attempt)
  if not owns(attempt) then return nil end
  local status = redis.call('HGET', JOB, 'status')
  if TERMINAL[status] then return nil end
  return status
end

-- An attempt's scripts take its worker's registry entry as KEYS[6] (optional): the claim
-- marks the job as the worker's current one, and the script that ends the attempt clears it,
-- so that neither costs a round trip of its own.
local function mark_worker(id)
  if KEYS[6] and redis.call('EXISTS', KEYS[6]) == 1 then
    redis.call('HSET', KEYS[6], 'current_job', id)
  end
end

local function clear_worker(id)
  if KEYS[6] and redis.call('HGET', KEYS[6], 'current_job') == id then
    redis.call('HDEL', KEYS[6], 'current_job')
  end
end

-- A finished job needs neither its lease nor its checkpoint; what its tenant keeps shrinks
-- from the steps reserved at submit to the steps stored.
local function finish(id, old, new, now)
  clear_worker(id)
  redis.call('DEL', LEASE, CKPT)
  redis.call('HSET', JOB, 'finished_at', now)
  local reserved = tonumber(redis.call('HGET', JOB, 'bytes') or '0')
  local kept = tonumber(redis.call('HGET', JOB, 'spec_bytes') or '0')
             + tonumber(redis.call('HGET', JOB, 'steps_done')) *
               tonumber(redis.call('HGET', JOB, 'row_bytes') or '0')
  local tenant = redis.call('HGET', JOB, 'tenant')
  if tenant and kept < reserved then
    redis.call('DECRBY', tenant_storage(tenant), reserved - kept)
    redis.call('HSET', JOB, 'bytes', kept)
  end
  set_status(id, old, new)
end

-- The attempt that the reaper requeued while it was paused is back, and no newer attempt
-- claimed the job: it takes the job back, and its lapse does not count as a lost attempt.
local function take_back(id)
  redis.call('HINCRBY', JOB, 'lost', -1)
  set_status(id, 'queued', 'running')
end

-- The attempt holding the job lost its worker (its lease lapsed). Returns what happens next:
-- 'cancelled' (a cancel was pending), 'failed' (too many attempts lost) or 'requeue'.
local function lapse(id, status, max_attempts, now)
  local lost = redis.call('HINCRBY', JOB, 'lost', 1)
  local attempt = redis.call('HGET', JOB, 'attempt')
  local worker = redis.call('HGET', JOB, 'worker') or '?'
  if status == 'cancelling' then
    finish(id, status, 'cancelled', now)
    return 'cancelled'
  end
  if lost >= tonumber(max_attempts) then
    redis.call('HSET', JOB, 'error', 'worker lost ' .. lost .. ' time(s), last during attempt '
               .. attempt .. ' on ' .. worker .. '; max_attempts is ' .. max_attempts)
    finish(id, status, 'failed', now)
    return 'failed'
  end
  redis.call('HSET', JOB, 'route_reason',
             'requeued: attempt ' .. attempt .. ' lost its worker ' .. worker)
  return 'requeue'
end
"""


def _script(body: str, allow_oom: bool = False, helpers: bool = True) -> str:
    shebang = "#!lua flags=allow-oom" if allow_oom else "#!lua"
    return shebang + "\n" + (_HELPERS if helpers else "") + body


# KEYS: the job's keys, then the idempotency key (optional). ARGV: job id, idempotency TTL s,
# tenant, the tenant's limit of active jobs, the tenant's storage limit in bytes, the bytes
# this job reserves, then the record's field/value pairs. Returns {id, 1} for a new job,
# {id, 0} for the one the idempotency key already names, {'limit', n} when the tenant already
# has n >= limit jobs queued or running, {'storage', used} when the job's bytes do not fit.
CREATE = _script(
    """
local idem = KEYS[6]
if idem then
  local existing = redis.call('GET', idem)
  if existing then return {existing, 0} end
end
local tenant = ARGV[3]
local active = 0
for _, status in ipairs({'queued', 'running', 'cancelling'}) do
  active = active + redis.call('ZCARD', tenant_index(tenant, status))
end
if active >= tonumber(ARGV[4]) then return {'limit', active} end
local used = tonumber(redis.call('GET', tenant_storage(tenant)) or '0')
if used + tonumber(ARGV[6]) > tonumber(ARGV[5]) then return {'storage', tostring(used)} end
redis.call('HSET', JOB, unpack(ARGV, 7))
redis.call('INCRBY', tenant_storage(tenant), ARGV[6])
redis.call('ZADD', JOBS_INDEX, 0, ARGV[1])
redis.call('ZADD', STATUS_INDEX .. 'queued', 0, ARGV[1])
redis.call('ZADD', tenant_index(tenant), 0, ARGV[1])
redis.call('ZADD', tenant_index(tenant, 'queued'), 0, ARGV[1])
redis.call('HSET', JOB, 'queued_at', redis.call('TIME')[1])
redis.call('XADD', EVENTS, '*', 'status', 'queued', 'steps_done', 0)
if idem then
  redis.call('SET', idem, ARGV[1], 'EX', ARGV[2])
  redis.call('HSET', JOB, 'idempotency', idem)
end
return {ARGV[1], 1}
"""
)

# KEYS: the job's keys, the worker's entry. ARGV: job id, worker, now, lease ms, max attempts.
# Takes a queued job, or a running one whose lease lapsed, for a new attempt. Returns
# {'claimed', attempt, spec, checkpoint field/value pairs...} or {reason, status}.
CLAIM = _script(
    """
local status = redis.call('HGET', JOB, 'status')
if not status then return {'missing', ''} end
if TERMINAL[status] then return {'finished', status} end
if status ~= 'queued' then
  if redis.call('EXISTS', LEASE) == 1 then return {'busy', status} end
  -- The lease lapsed and the reaper has not got to it yet: this delivery takes over.
  local next = lapse(ARGV[1], status, ARGV[5], ARGV[3])
  if next ~= 'requeue' then return {next, next} end
end
local attempt = redis.call('HINCRBY', JOB, 'attempt', 1)
redis.call('SET', LEASE, attempt, 'PX', ARGV[4])
redis.call('HSET', JOB, 'worker', ARGV[2])
if redis.call('HEXISTS', JOB, 'started_at') == 0 then
  redis.call('HSET', JOB, 'started_at', ARGV[3])
end
if status ~= 'running' then set_status(ARGV[1], status, 'running') end
mark_worker(ARGV[1])
local reply = {'claimed', tostring(attempt), redis.call('HGET', JOB, 'spec')}
for _, v in ipairs(redis.call('HGETALL', CKPT)) do table.insert(reply, v) end
return reply
"""
)

# KEYS: the job's keys, the worker's entry. ARGV: job id, attempt, first step, entry id, now,
# finish status ('' to go on), result JSON, error, lease ms, checkpoint theta, checkpoint
# optimizer state, the last step's loss (float32 bytes), then the chunk's field/value pairs
# (none for a flush without steps). Appends the chunk, writes the checkpoint that matches its
# last step and renews the lease.
FLUSH = _script(
    """
if not owns(ARGV[2]) then return {'fenced'} end
local status = redis.call('HGET', JOB, 'status')
local done = tonumber(redis.call('HGET', JOB, 'steps_done'))
local chunk = #ARGV > 12
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
  redis.call('XADD', STEPS, ARGV[4], unpack(ARGV, 13))
  -- Service-wide counters for /metrics (outside the hash tag, like the indexes).
  redis.call('HINCRBY', STATS, 'steps', last + 1 - done)
  redis.call('HINCRBY', STATS, 'flushes', 1)
  done = last + 1
  redis.call('HSET', JOB, 'steps_done', done)
  redis.call('HSET', CKPT, 'step', done, 'theta', ARGV[10], 'optimizer', ARGV[11],
             'loss', ARGV[12])
end
if status == 'queued' then
  take_back(ARGV[1])
  status = 'running'
end
if ARGV[6] ~= '' then
  if ARGV[7] ~= '' then redis.call('HSET', JOB, 'result', ARGV[7]) end
  if ARGV[8] ~= '' then redis.call('HSET', JOB, 'error', ARGV[8]) end
  finish(ARGV[1], status, ARGV[6], ARGV[5])
  return {'finished'}
end
if status == 'cancelling' then
  finish(ARGV[1], status, 'cancelled', ARGV[5])
  return {'cancelled'}
end
redis.call('SET', LEASE, ARGV[2], 'PX', ARGV[9])
return {'ok'}
"""
)

# KEYS: the job's keys. ARGV: job id, attempt, lease ms. 1 if the attempt still owns the job.
# Allowed on a full Redis: it rewrites a small key, and a lapsed lease would cost an attempt.
RENEW = _script(
    """
local status = owned_status(ARGV[2])
if not status then return 0 end
if status == 'queued' then take_back(ARGV[1]) end
redis.call('SET', LEASE, ARGV[2], 'PX', ARGV[3])
return 1
""",
    allow_oom=True,
)

# KEYS: the job's keys, the worker's entry. ARGV: job id, attempt, now, reason. An attempt
# hands its job back (its worker is shutting down, Redis lost its latest steps, or Redis is
# full): queued again, to resume from the checkpoint, and the attempt owns it no more.
# Returns the job's queue, '' if it was cancelled instead, or nil if the attempt no longer
# owns the job.
RELEASE = _script(
    """
local status = owned_status(ARGV[2])
if not status then return false end
redis.call('DEL', LEASE)
redis.call('HSET', JOB, 'released', ARGV[2])
if status == 'cancelling' then
  finish(ARGV[1], status, 'cancelled', ARGV[3])
  return ''
end
redis.call('HSET', JOB, 'route_reason', ARGV[4])
if status ~= 'queued' then set_status(ARGV[1], status, 'queued') end
clear_worker(ARGV[1])
return redis.call('HGET', JOB, 'queue')
""",
    allow_oom=True,
)

# KEYS: the job's keys. ARGV: job id, now, max attempts. The reaper's check of one running
# job: if its lease lapsed, the job is requeued (or ends cancelled or failed). Returns the
# queue to send a new message to, or false. Allowed on a full Redis: it frees the lease (and
# for an ended job the checkpoint) and changes a few fields.
REAP = _script(
    """
local status = redis.call('HGET', JOB, 'status')
if status ~= 'running' and status ~= 'cancelling' then return false end
if redis.call('EXISTS', LEASE) == 1 then return false end
if lapse(ARGV[1], status, ARGV[3], ARGV[2]) ~= 'requeue' then return false end
set_status(ARGV[1], status, 'queued')
return redis.call('HGET', JOB, 'queue')
""",
    allow_oom=True,
)

# KEYS: the job's keys. ARGV: job id, now. Allowed on a full Redis: stopping work is how a
# user makes room.
CANCEL = _script(
    """
local status = redis.call('HGET', JOB, 'status')
if not status then return {'missing', ''} end
if status == 'queued' then
  finish(ARGV[1], status, 'cancelled', ARGV[2])
  return {'ok', 'cancelled'}
end
if status == 'running' then
  set_status(ARGV[1], status, 'cancelling')
  return {'ok', 'cancelling'}
end
if status == 'cancelling' then return {'ok', status} end
return {'finished', status}
""",
    allow_oom=True,
)

# KEYS: the job's keys, the worker's entry. ARGV: job id, attempt, error, now.
FAIL = _script(
    """
local status = owned_status(ARGV[2])
if not status then return 0 end
redis.call('HSET', JOB, 'error', ARGV[3])
finish(ARGV[1], status, 'failed', ARGV[4])
return 1
""",
    allow_oom=True,
)

# KEYS: the job's keys. ARGV: job id, '1' to delete whatever its status (a job that could not
# be enqueued). Removes the job's keys, its index entries and its idempotency key, and gives
# its bytes back to its tenant. Returns {'deleted'}, {'missing'} or {'live', status} (a queued
# or running job is cancelled first).
DELETE = _script(
    """
local status = redis.call('HGET', JOB, 'status')
if not status then return {'missing'} end
if not TERMINAL[status] and ARGV[2] ~= '1' then return {'live', status} end
local tenant = redis.call('HGET', JOB, 'tenant')
local bytes = redis.call('HGET', JOB, 'bytes')
if tenant then
  redis.call('ZREM', tenant_index(tenant), ARGV[1])
  redis.call('ZREM', tenant_index(tenant, status), ARGV[1])
  if bytes then redis.call('DECRBY', tenant_storage(tenant), bytes) end
end
redis.call('ZREM', JOBS_INDEX, ARGV[1])
redis.call('ZREM', STATUS_INDEX .. status, ARGV[1])
local idem = redis.call('HGET', JOB, 'idempotency')
if idem and redis.call('GET', idem) == ARGV[1] then redis.call('DEL', idem) end
redis.call('DEL', JOB, STEPS, EVENTS, LEASE, CKPT)
return {'deleted'}
""",
    allow_oom=True,
)

# Datasets: KEYS for each script are the dataset, its tenants (refs), the tenant's datasets
# and the tenant's storage.

# ARGV: tenant, dataset id, the tenant's limit of datasets, its storage limit, the bytes the
# dataset keeps, then the dataset hash's field/value pairs. Gives the tenant a reference (and
# writes the data unless it is there): {'added'}, {'exists'} (the tenant has it already),
# {'quota', n} or {'storage', used}.
PUT_DATASET = _script(
    """
if redis.call('SISMEMBER', KEYS[3], ARGV[2]) == 1 then return {'exists'} end
local held = redis.call('SCARD', KEYS[3])
if held >= tonumber(ARGV[3]) then return {'quota', tostring(held)} end
local used = tonumber(redis.call('GET', KEYS[4]) or '0')
if used + tonumber(ARGV[5]) > tonumber(ARGV[4]) then return {'storage', tostring(used)} end
if redis.call('HEXISTS', KEYS[1], 'x') == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], unpack(ARGV, 6))
end
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('INCRBY', KEYS[4], ARGV[5])
return {'added'}
""",
    helpers=False,
)

# ARGV: tenant, dataset id. Drops the tenant's reference unless a queued or running job of the
# tenant trains on it; the bytes go with the last reference. Returns {'dropped'}, {'missing'}
# or {'busy', job id}.
DROP_DATASET = _script(
    """
if redis.call('SISMEMBER', KEYS[3], ARGV[2]) == 0 then return {'missing'} end
for _, status in ipairs({'queued', 'running', 'cancelling'}) do
  for _, id in ipairs(redis.call('ZRANGE', tenant_index(ARGV[1], status), 0, -1)) do
    if redis.call('HGET', job_key(id), 'dataset') == ARGV[2] then
      return {'busy', id}
    end
  end
end
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('DECRBY', KEYS[4], redis.call('HGET', KEYS[1], 'stored') or 0)
if redis.call('SCARD', KEYS[2]) == 0 then redis.call('DEL', KEYS[1]) end
return {'dropped'}
""",
    allow_oom=True,
)

# KEYS: dataset. Counts a worker's load of the dataset, if it is still there (a load never
# makes a hash of a dataset dropped meanwhile). Allowed on a full Redis: a counter in place.
COUNT_LOAD = _script(
    """
if redis.call('HEXISTS', KEYS[1], 'x') == 0 then return 0 end
return redis.call('HINCRBY', KEYS[1], 'loads', 1)
""",
    allow_oom=True,
    helpers=False,
)

# KEYS: the job's keys. ARGV: now (Redis seconds). The orphan check's mark on a job still
# queued: its next check is `orphan_after_s` away. Never makes a record of a deleted job.
TOUCH_QUEUED = _script(
    """
if redis.call('HGET', JOB, 'status') ~= 'queued' then return 0 end
redis.call('HSET', JOB, 'queued_at', ARGV[1])
return 1
""",
    allow_oom=True,
)
