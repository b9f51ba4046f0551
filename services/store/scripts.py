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

from collections.abc import Callable

from services.records import FIELD_COUNT, FIELD_ROWS
from services.schemas import TERMINAL_STATUSES
from services.store import keys


def _lua_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_TERMINAL = ", ".join(f"[{_lua_string(s.value)}] = true" for s in sorted(TERMINAL_STATUSES))


def _key_function(name: str, key_of: Callable[..., str], *params: str) -> str:
    """A Lua function of `params` that spells a key as `key_of` does in keys.py: the Lua takes
    every key name (and stream entry id) from there, never a literal of its own."""
    marked = key_of(*(f"\0{param}\0" for param in params)).split("\0")
    # Literal parts at even places, parameters at odd ones.
    parts = [part if i % 2 else _lua_string(part) for i, part in enumerate(marked) if part or i % 2]
    return f"local function {name}({', '.join(params)})\n  return {' .. '.join(parts)}\nend\n"


# Each Lua function: its name, the function of keys.py it spells, its parameters.
_KEY_SPELLINGS: list[tuple[str, Callable[..., str], str]] = [
    ("job_key", keys.job_key, "id"),
    ("steps_key", keys.steps_key, "id"),
    ("events_key", keys.events_key, "id"),
    ("lease_key", keys.lease_key, "id"),
    ("ckpt_key", keys.ckpt_key, "id"),
    ("sweep_key", keys.sweep_key, "id"),
    ("sweep_events_key", keys.sweep_events_key, "id"),
    ("sweep_members_key", keys.sweep_members_key, "id"),
    ("sweep_finals_loss", lambda sweep: keys.sweep_finals_key(sweep, "loss"), "id"),
    ("sweep_finals_val_loss", lambda sweep: keys.sweep_finals_key(sweep, "val_loss"), "id"),
    ("tenant_sweeps", keys.tenant_sweeps, "id"),
    ("tenant_active_sweeps", keys.tenant_active_sweeps, "id"),
    ("dataset_key", keys.dataset_key, "id"),
    ("tenant_jobs", keys.tenant_index, "tenant"),
    ("tenant_jobs_in", keys.tenant_index, "tenant status"),
    ("tenant_storage", keys.tenant_storage, "tenant"),
    # A tenant's sweep members not yet ended: its active jobs count its sweeps instead.
    ("tenant_active_members", keys.tenant_active_members, "tenant"),
    # The tenant's jobs and sweeps not yet ended that use a dataset: `id` joins the sets
    # of the datasets it names (space-separated) while it is queued or running, so that a
    # dataset's delete asks one set instead of reading every active job.
    ("dataset_users", keys.dataset_users, "tenant dataset"),
    ("entry_id", keys.step_entry_id, "step"),
]
_KEY_FUNCTIONS = "".join(
    _key_function(name, key_of, *params.split()) for name, key_of, params in _KEY_SPELLINGS
)

# What the Lua takes from keys.py and schemas.py: key names, index prefixes, field names. The
# hand-written Lua below and in each script spells none of them (tests/test_scripts.py).
GENERATED = f"""
local TERMINAL = {{{_TERMINAL}}}
local JOBS_INDEX = {_lua_string(keys.JOBS_INDEX)}
local STATUS_INDEX = {_lua_string(keys.STATUS_INDEX_PREFIX)}
local GROUP_INDEX = {_lua_string(keys.GROUP_STATUS_PREFIX)}
local MEMBER_INDEX = {_lua_string(keys.MEMBER_STATUS_PREFIX)}
local STATS = {_lua_string(keys.STATS_KEY)}
local ARCHIVE_DUE = {_lua_string(keys.ARCHIVE_DUE)}
local ARCHIVE_REMOVALS = {_lua_string(keys.ARCHIVE_REMOVALS)}
local SWEEP_STATUS = {_lua_string(keys.SWEEP_STATUS_PREFIX)}
local ENVIRONMENT = {_lua_string(keys.ENVIRONMENT_FIELD_PREFIX)}
local FIELD_COUNT = {_lua_string(FIELD_COUNT.decode())}
local FIELD_ROWS = {_lua_string(FIELD_ROWS.decode())}
{_KEY_FUNCTIONS}"""

# Shared helpers, after each script's `#!lua` line.
_HELPERS = (
    GENERATED
    + """
local JOB, STEPS, EVENTS, LEASE, CKPT = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]

local function tenant_index(tenant, status)
  if status then return tenant_jobs_in(tenant, status) end
  return tenant_jobs(tenant)
end

local function use_datasets(tenant, id, datasets)
  for dataset in string.gmatch(datasets or '', '%S+') do
    redis.call('SADD', dataset_users(tenant, dataset), id)
  end
end

local function release_datasets(tenant, id, datasets)
  for dataset in string.gmatch(datasets or '', '%S+') do
    redis.call('SREM', dataset_users(tenant, dataset), id)
  end
end

-- An archived job is being deleted: its file (where its record says it is, whatever the
-- archive's settings are now) joins the files to remove, and its URL is returned to the
-- caller, which removes it at once. One whose removal fails stays for the archivers.
local function remove_archived(archived, reply)
  if not archived then return end
  local ok, file = pcall(cjson.decode, archived)
  if ok and type(file) == 'table' and type(file.url) == 'string' then
    redis.call('ZADD', ARCHIVE_REMOVALS, redis.call('TIME')[1], file.url)
    reply[#reply + 1] = file.url
  end
end

-- The jobs and sweeps of `tenant` that count against its limit of active jobs.
local function active_jobs(tenant)
  local active = redis.call('SCARD', tenant_active_sweeps(tenant))
    - tonumber(redis.call('GET', tenant_active_members(tenant)) or '0')
  for _, status in ipairs({'queued', 'running', 'cancelling'}) do
    active = active + redis.call('ZCARD', tenant_index(tenant, status))
  end
  return active
end

-- Jobs, a sweep's groups and its members are indexed by status apart: a group is a unit of
-- work, not a job (the reaper and the orphan check read both), and a member is trained and
-- leased by its group, so neither of them reads the members' index (a pass costs what it
-- must check, not one REAP per running member).
local function status_index(status)
  if redis.call('HEXISTS', JOB, 'members') == 1 then return GROUP_INDEX .. status end
  if redis.call('HEXISTS', JOB, 'group') == 1 then return MEMBER_INDEX .. status end
  return STATUS_INDEX .. status
end

-- Point the job helpers below (set_status, finish, ...) at another job: a sweep's scripts
-- walk its members this way. Returns the keys to restore with restore_job.
local function use_job(id)
  local saved = {JOB, STEPS, EVENTS, LEASE, CKPT}
  JOB, STEPS, EVENTS, LEASE, CKPT = job_key(id), steps_key(id), events_key(id), lease_key(id),
    ckpt_key(id)
  return saved
end

local function restore_job(saved)
  JOB, STEPS, EVENTS, LEASE, CKPT = saved[1], saved[2], saved[3], saved[4], saved[5]
end

-- The bytes of one event of a sweep's stream: its id, field names and values.
local function event_bytes(id, kind, data)
  return #id + #'type' + #kind + #'data' + #data
end

-- A sweep's event stream: ids are a sequence number (`<seq>-1`) that Last-Event-ID resumes
-- from. It keeps the latest `events_keep` events (the sweep's setting at submit): a flush of
-- any group adds one, so an unbounded stream would outgrow every member's steps. What it
-- keeps counts in the tenant's storage and in the sweep's `bytes` (freed when the sweep is
-- deleted): each event adds its bytes, and the events trimmed to make room give theirs back.
local function sweep_event(sweep, kind, data)
  local record, stream = sweep_key(sweep), sweep_events_key(sweep)
  local seq = redis.call('HINCRBY', record, 'seq', 1)
  local id = entry_id(seq)
  local keep = tonumber(redis.call('HGET', record, 'events_keep'))
  local grown = event_bytes(id, kind, data)
  if keep then
    local over = redis.call('XLEN', stream) + 1 - keep
    if over > 0 then
      for _, entry in ipairs(redis.call('XRANGE', stream, '-', '+', 'COUNT', over)) do
        local fields = {}
        for f = 1, #entry[2], 2 do fields[entry[2][f]] = entry[2][f + 1] end
        grown = grown - event_bytes(entry[1], fields.type or '', fields.data or '')
      end
    end
    redis.call('XADD', stream, 'MAXLEN', keep, id, 'type', kind, 'data', data)
  else
    redis.call('XADD', stream, id, 'type', kind, 'data', data)
  end
  redis.call('HINCRBY', record, 'events_bytes', grown)
  redis.call('HINCRBY', record, 'bytes', grown)
  redis.call('INCRBY', tenant_storage(redis.call('HGET', record, 'tenant')), grown)
end

-- A sweep's status lives in its record and in the global index of sweeps per status (which
-- /metrics counts); `old` is nil for a new sweep.
local function set_sweep_status(sweep, old, new)
  redis.call('HSET', sweep_key(sweep), 'status', new)
  if old then redis.call('SREM', SWEEP_STATUS .. old, sweep) end
  redis.call('SADD', SWEEP_STATUS .. new, sweep)
end

-- Status changes keep the hash, the status indexes (all jobs', and the job's tenant's) and
-- the job's event stream (which SSE readers tail) in step. The indexes sit outside the job's
-- hash tag: one Redis, not a cluster.
local function set_status(id, old, new)
  redis.call('HSET', JOB, 'status', new)
  -- A member's sweep counts its members per status (`c:<status>`), so that reading a sweep's
  -- counts reads none of its members.
  if redis.call('HEXISTS', JOB, 'group') == 1 then
    local record = sweep_key(redis.call('HGET', JOB, 'sweep'))
    if redis.call('EXISTS', record) == 1 then
      redis.call('HINCRBY', record, 'c:' .. old, -1)
      redis.call('HINCRBY', record, 'c:' .. new, 1)
    end
  end
  if new == 'queued' then
    redis.call('HSET', JOB, 'queued_at', redis.call('TIME')[1])
  end
  local index = status_index(old)
  redis.call('ZREM', index, id)
  -- A member stored before members had an index of their own sits in the jobs' one.
  if index ~= STATUS_INDEX .. old then redis.call('ZREM', STATUS_INDEX .. old, id) end
  redis.call('ZADD', status_index(new), 0, id)
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

local member_ended, end_members

-- The full rows a sparse job (record.every > 1, `record_every`) kept of its `done` steps:
-- those divisible by every, and the last if the job ended there by itself (`new`: its rows
-- were packed knowing it, services/records.py), not when a cancel or a failure ended it.
local function kept_rows(done, new)
  local every = tonumber(redis.call('HGET', JOB, 'record_every') or '1')
  if done <= 0 then return 0 end
  local rows = math.floor((done - 1) / every) + 1
  if (done - 1) % every ~= 0 and (new == 'succeeded' or new == 'diverged' or new == 'pruned') then
    rows = rows + 1
  end
  return rows
end

-- A finished job needs neither its lease nor its checkpoint; what its tenant keeps shrinks
-- from the steps reserved at submit to the steps stored (a sparse job: and the full rows).
local function finish(id, old, new, now)
  clear_worker(id)
  redis.call('DEL', LEASE, CKPT)
  redis.call('HSET', JOB, 'finished_at', now)
  local reserved = tonumber(redis.call('HGET', JOB, 'bytes') or '0')
  local done = tonumber(redis.call('HGET', JOB, 'steps_done'))
  local kept = tonumber(redis.call('HGET', JOB, 'spec_bytes') or '0')
             + done * tonumber(redis.call('HGET', JOB, 'row_bytes') or '0')
  local kept_row_bytes = tonumber(redis.call('HGET', JOB, 'kept_row_bytes') or '0')
  if kept_row_bytes > 0 then kept = kept + kept_rows(done, new) * kept_row_bytes end
  local tenant = redis.call('HGET', JOB, 'tenant')
  if tenant and kept < reserved then
    redis.call('DECRBY', tenant_storage(tenant), reserved - kept)
    redis.call('HSET', JOB, 'bytes', kept)
  end
  if tenant then release_datasets(tenant, id, redis.call('HGET', JOB, 'datasets')) end
  set_status(id, old, new)
  -- Its steps go to the archive once it has been finished for the hot retention (a group
  -- stores no steps of its own: its members do).
  if redis.call('HEXISTS', JOB, 'members') == 0
     and tonumber(redis.call('HGET', JOB, 'steps_done') or '0') > 0 then
    redis.call('ZADD', ARCHIVE_DUE, redis.call('TIME')[1], id)
  end
  if redis.call('HEXISTS', JOB, 'group') == 1 then  -- a sweep's member
    redis.call('DECR', tenant_active_members(tenant))
    member_ended(id, redis.call('HGET', JOB, 'sweep'), new, now)
  end
  local members = redis.call('HGET', JOB, 'members')  -- a sweep's group
  if members then end_members(members, new, now) end
end

-- A member of `sweep` ended `status`: the sweep counts it, and ends with its last member
-- (cancelled if a cancel was asked for, succeeded if a member succeeded, failed otherwise).
-- A member that succeeded is ranked by its final loss and validation loss (sorted sets
-- scored by each, written to 17 digits: exact), so that the sweep's best reads a few.
member_ended = function(id, sweep, status, now)
  local record = sweep_key(sweep)
  redis.call('HINCRBY', record, 'n:' .. status, 1)
  if status == 'succeeded' then
    local ok, result = pcall(cjson.decode, redis.call('HGET', JOB, 'result') or 'null')
    if ok and type(result) == 'table' and type(result.full_loss) == 'number' then
      redis.call('ZADD', sweep_finals_loss(sweep), string.format('%.17g', result.full_loss), id)
      if type(result.val_loss) == 'number' then
        redis.call('ZADD', sweep_finals_val_loss(sweep), string.format('%.17g', result.val_loss),
                   id)
      end
    end
  end
  if redis.call('HINCRBY', record, 'remaining', -1) > 0 then return end
  local final = 'failed'
  if redis.call('HGET', record, 'cancel') == '1' then
    final = 'cancelled'
  elseif tonumber(redis.call('HGET', record, 'n:succeeded') or '0') > 0 then
    final = 'succeeded'
  end
  set_sweep_status(sweep, redis.call('HGET', record, 'status'), final)
  redis.call('HSET', record, 'finished_at', now)
  local tenant = redis.call('HGET', record, 'tenant')
  redis.call('SREM', tenant_active_sweeps(tenant), sweep)
  release_datasets(tenant, sweep, redis.call('HGET', record, 'datasets'))
  sweep_event(sweep, 'done', final)
end

-- A group ended (`status`) with members still unfinished (it failed, or lost its worker too
-- often): they end with it, failed with the group's error (cancelled if they were being).
end_members = function(members, status, now)
  local error = redis.call('HGET', JOB, 'error')
  for id in string.gmatch(members, '%S+') do
    local saved = use_job(id)
    local current = redis.call('HGET', JOB, 'status')
    if current and not TERMINAL[current] then
      local new = 'failed'
      if current == 'cancelling' or status == 'cancelled' then new = 'cancelled' end
      if new == 'failed' and error then redis.call('HSET', JOB, 'error', error) end
      finish(id, current, new, now)
    end
    restore_job(saved)
  end
end

-- A sweep's group goes back to the queue (handed back, or its lease lapsed): its running
-- members are queued with it, `reason` their route_reason, as a job would be; a member being
-- cancelled ends cancelled now, as no attempt trains it. One progress event tells the
-- sweep's watchers.
local function requeue_members(members, reason, now)
  local progress, sweep = {}, nil
  for id in string.gmatch(members, '%S+') do
    local saved = use_job(id)
    local current = redis.call('HGET', JOB, 'status')
    local new = nil
    if current == 'running' then
      redis.call('HSET', JOB, 'route_reason', reason)
      set_status(id, current, 'queued')
      new = 'queued'
    elseif current == 'cancelling' then
      new = 'cancelled'
    end
    if new then
      sweep = redis.call('HGET', JOB, 'sweep')
      local loss = tonumber(redis.call('HGET', JOB, 'loss') or '')
      progress[id] = {step = tonumber(redis.call('HGET', JOB, 'steps_done') or '0') - 1,
                      loss = loss or cjson.null, status = new}
    end
    restore_job(saved)
  end
  -- The progress event goes first: a last member's cancel ends the sweep (its `done` event).
  if sweep then sweep_event(sweep, 'progress', cjson.encode({members = progress})) end
  for id, update in pairs(progress) do
    if update.status == 'cancelled' then
      local saved = use_job(id)
      finish(id, 'cancelling', 'cancelled', now)
      restore_job(saved)
    end
  end
end

-- The attempt that the reaper requeued while it was paused is back, and no newer attempt
-- claimed the job: it takes the job back, and its lapse does not count as a lost attempt.
local function take_back(id)
  redis.call('HINCRBY', JOB, 'lost', -1)
  set_status(id, 'queued', 'running')
end

-- An attempt's environment (AttemptEnvironment as JSON), sent with its first flush: kept as
-- `env:<attempt>` (a retried flush rewrites the same field), and the first attempt's stepper
-- becomes the job's, which every later attempt runs (DESIGN §11). A flush records it before
-- anything else it writes (decoding it may raise).
local function record_environment(attempt, environment)
  local stepper = cjson.decode(environment).stepper
  redis.call('HSET', JOB, ENVIRONMENT .. attempt, environment)
  redis.call('HSETNX', JOB, 'stepper', stepper)
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
)


def _script(
    body: str, allow_oom: bool = False, helpers: bool = True, flags: str | None = None
) -> str:
    if flags is None:
        flags = "allow-oom" if allow_oom else ""
    shebang = f"#!lua flags={flags}" if flags else "#!lua"
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
local active = active_jobs(tenant)
if active >= tonumber(ARGV[4]) then return {'limit', active} end
local used = tonumber(redis.call('GET', tenant_storage(tenant)) or '0')
if used + tonumber(ARGV[6]) > tonumber(ARGV[5]) then return {'storage', tostring(used)} end
redis.call('HSET', JOB, unpack(ARGV, 7))
redis.call('INCRBY', tenant_storage(tenant), ARGV[6])
use_datasets(tenant, ARGV[1], redis.call('HGET', JOB, 'datasets'))
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
# {'claimed', attempt, spec, recorded stepper ('' if none), checkpoint field/value pairs...}
# or {reason, status}.
CLAIM = _script(
    """
local status = redis.call('HGET', JOB, 'status')
if not status then return {'missing', ''} end
if TERMINAL[status] then return {'finished', status} end
-- A sweep's member is trained by its group's attempts, never on its own.
if redis.call('HEXISTS', JOB, 'group') == 1 then return {'member', status} end
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
local reply = {'claimed', tostring(attempt), redis.call('HGET', JOB, 'spec'),
               redis.call('HGET', JOB, 'stepper') or ''}
for _, v in ipairs(redis.call('HGETALL', CKPT)) do table.insert(reply, v) end
return reply
"""
)

# KEYS: the job's keys, the worker's entry. ARGV: job id, attempt, first step, entry id, now,
# finish status ('' to go on), result JSON, error, lease ms, checkpoint theta, checkpoint
# optimizer state, the last step's loss (float32 bytes), the attempt's environment (JSON, on
# its first flush; else ''), then the chunk's field/value pairs (none for a flush without
# steps). Appends the chunk, writes the checkpoint that matches its last step and renews the
# lease.
FLUSH = _script(
    """
if not owns(ARGV[2]) then return {'fenced'} end
local status = redis.call('HGET', JOB, 'status')
local done = tonumber(redis.call('HGET', JOB, 'steps_done'))
local chunk = #ARGV > 13
local last = chunk and tonumber(string.match(ARGV[4], '^(%d+)')) or -1
-- A retry of this very flush, whose reply was lost: it was applied already.
if (chunk and done == last + 1) or (not chunk and status == ARGV[6]) then
  if status == ARGV[6] then return {'finished'} end
  if status == 'cancelled' then return {'cancelled'} end
  if not TERMINAL[status] then return {'ok'} end
end
if TERMINAL[status] then return {'fenced'} end
if chunk and tonumber(ARGV[3]) ~= done then return {'gap', tostring(done)} end
if ARGV[13] ~= '' then record_environment(ARGV[2], ARGV[13]) end
if chunk then
  redis.call('XADD', STEPS, ARGV[4], unpack(ARGV, 14))
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
local members = redis.call('HGET', JOB, 'members')  -- a sweep's group
if members then requeue_members(members, ARGV[4], ARGV[3]) end
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
-- A sweep's member has no lease of its own: its group's lease is reaped instead (members
-- are not in the indexes the reaper reads; one stored before that may still be).
if redis.call('HEXISTS', JOB, 'group') == 1 then return false end
if redis.call('EXISTS', LEASE) == 1 then return false end
if lapse(ARGV[1], status, ARGV[3], ARGV[2]) ~= 'requeue' then return false end
set_status(ARGV[1], status, 'queued')
local members = redis.call('HGET', JOB, 'members')  -- a sweep's group
if members then
  requeue_members(members, redis.call('HGET', JOB, 'route_reason'), ARGV[2])
end
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
# its bytes back to its tenant. Returns {'deleted'} (with the URL of its archived file, to be
# removed, if it was archived), {'missing'} or {'live', status} (a queued or running job is
# cancelled first).
DELETE = _script(
    """
local status = redis.call('HGET', JOB, 'status')
if not status then return {'missing'} end
if not TERMINAL[status] and ARGV[2] ~= '1' then return {'live', status} end
-- A member goes with its sweep (DELETE /v1/sweeps/{id}): its group's checkpoint counts on it.
local sweep = redis.call('HGET', JOB, 'sweep')
if sweep and redis.call('HEXISTS', JOB, 'group') == 1 and ARGV[2] ~= '1' then
  return {'member', sweep}
end
local tenant = redis.call('HGET', JOB, 'tenant')
local bytes = redis.call('HGET', JOB, 'bytes')
if tenant then
  redis.call('ZREM', tenant_index(tenant), ARGV[1])
  redis.call('ZREM', tenant_index(tenant, status), ARGV[1])
  if bytes then redis.call('DECRBY', tenant_storage(tenant), bytes) end
  release_datasets(tenant, ARGV[1], redis.call('HGET', JOB, 'datasets'))
end
redis.call('ZREM', JOBS_INDEX, ARGV[1])
redis.call('ZREM', status_index(status), ARGV[1])
redis.call('ZREM', STATUS_INDEX .. status, ARGV[1])
redis.call('ZREM', ARCHIVE_DUE, ARGV[1])
local idem = redis.call('HGET', JOB, 'idempotency')
if idem and redis.call('GET', idem) == ARGV[1] then redis.call('DEL', idem) end
local reply = {'deleted'}
remove_archived(redis.call('HGET', JOB, 'archived'), reply)
redis.call('DEL', JOB, STEPS, EVENTS, LEASE, CKPT)
return reply
""",
    allow_oom=True,
)

# Datasets: KEYS for each script are the dataset, its tenants (refs), the tenant's datasets,
# the tenant's storage and the tenant's users of the dataset (keys.dataset_users).

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

# ARGV: tenant, dataset id. Drops the tenant's reference unless a queued or running job or
# sweep of the tenant trains on it (one set answers: its users, kept by CREATE, CREATE_SWEEP,
# finish and the deletes); the bytes go with the last reference. A sweep's own dataset (its
# inline data) is no tenant's reference: it goes with its sweep. Returns {'dropped'},
# {'missing'}, {'busy', id, 'job' | 'sweep'} or {'owned', sweep id}.
DROP_DATASET = _script(
    """
if redis.call('SISMEMBER', KEYS[3], ARGV[2]) == 0 then
  local owner = redis.call('HMGET', KEYS[1], 'tenant', 'sweep')
  if owner[2] and owner[1] == ARGV[1] then return {'owned', owner[2]} end
  return {'missing'}
end
local user = redis.call('SRANDMEMBER', KEYS[5])
if user then
  if redis.call('EXISTS', sweep_key(user)) == 1 then return {'busy', user, 'sweep'} end
  return {'busy', user, 'job'}
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


# Sweeps (DESIGN §9). A sweep's members are jobs (a `sweep` and a `group` field); a group is a
# job-like unit of work (a `members` field, no tenant) that CLAIM, RENEW, RELEASE, REAP and
# FAIL treat like any job, so leases, hand-backs and the reaper work for groups unchanged.

# KEYS: the sweep's record and events, then the idempotency key (optional). ARGV: sweep id,
# tenant, the tenant's limit of active jobs, its storage limit, the bytes the sweep reserves,
# the idempotency TTL s, then records: id, kind ('sweep', 'dataset', 'group' or 'member'), n,
# then n field/value pairs. Writes the sweep, the datasets it owns (its inline data), its
# groups (queued) and its members (queued) at once, or nothing: {'ok'}, {'existing', id} for
# the sweep the idempotency key already names, {'limit', n} or {'storage', used}.
CREATE_SWEEP = _script(
    """
local sweep, tenant = ARGV[1], ARGV[2]
local idem = KEYS[3]
if idem then
  local existing = redis.call('GET', idem)
  if existing then return {'existing', existing} end
end
local active = active_jobs(tenant)
if active >= tonumber(ARGV[3]) then return {'limit', active} end
local used = tonumber(redis.call('GET', tenant_storage(tenant)) or '0')
if used + tonumber(ARGV[5]) > tonumber(ARGV[4]) then return {'storage', tostring(used)} end
local now = redis.call('TIME')[1]
local i, members = 7, 0
while i <= #ARGV do
  local id, kind, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local first, last = i + 3, i + 2 + 2 * n
  i = last + 1
  if kind == 'sweep' then
    redis.call('HSET', sweep_key(id), unpack(ARGV, first, last))
    set_sweep_status(id, nil, redis.call('HGET', sweep_key(id), 'status'))
    redis.call('ZADD', tenant_sweeps(tenant), 0, id)
    redis.call('SADD', tenant_active_sweeps(tenant), id)
    use_datasets(tenant, id, redis.call('HGET', sweep_key(id), 'datasets'))
  elseif kind == 'dataset' then
    -- The sweep's inline data, once for all its members (their specs name its id).
    redis.call('DEL', dataset_key(id))
    redis.call('HSET', dataset_key(id), unpack(ARGV, first, last))
  else
    redis.call('HSET', job_key(id), unpack(ARGV, first, last))
    redis.call('HSET', job_key(id), 'queued_at', now)
    if kind == 'group' then
      redis.call('ZADD', GROUP_INDEX .. 'queued', 0, id)
    else
      redis.call('ZADD', MEMBER_INDEX .. 'queued', 0, id)
      redis.call('ZADD', JOBS_INDEX, 0, id)
      redis.call('ZADD', tenant_index(tenant), 0, id)
      redis.call('ZADD', tenant_index(tenant, 'queued'), 0, id)
      redis.call('INCR', tenant_active_members(tenant))
      members = members + 1
      redis.call('ZADD', sweep_members_key(sweep), redis.call('HGET', job_key(id), 'index'), id)
      redis.call('XADD', events_key(id), '*', 'status', 'queued', 'steps_done', 0)
    end
  end
end
-- Members per status (`c:<status>`, set_status keeps them), and how many in all: a sweep
-- with `member_count` has counts a view can trust (one stored before them has none).
redis.call('HSET', sweep_key(sweep), 'c:queued', members, 'member_count', members)
redis.call('INCRBY', tenant_storage(tenant), ARGV[5])
if idem then
  redis.call('SET', idem, sweep, 'EX', ARGV[6])
  redis.call('HSET', sweep_key(sweep), 'idempotency', idem)
end
sweep_event(sweep, 'status', 'queued')
return {'ok'}
"""
)

# KEYS: the group's keys, the worker's entry. ARGV: group id, attempt, first step, steps in
# the chunk (0: none), now, lease ms, the group's checkpoint, '1' to end the group, the
# attempt's environment (JSON) with its first flush and again if its stepper changes, else ''
# (recorded on the group and its members, with the members' attempt and worker), n, then n
# field/value pairs every member's chunk shares, then of the members still training, each a
# space-separated list in member order: their ids, how many of the chunk's steps each keeps
# (fewer for a member that diverged: its chunk ends at its first non-finite step), the last
# step's loss ('-' if not finite) and the chunk's last evaluated validation loss ('-' if
# none); then e, and e times the members that end now: place in those lists (from 1), their
# terminal status, result JSON ('' if none), error ('' if none); then (FLUSH_GROUP only) each
# member's chunk rows. Lists, not eight arguments a member: a thousand members' arguments
# cost the client and Redis more to encode and decode than a few long strings. One fenced
# write of a whole group's flush: each member's chunk, the members that end, the group's
# checkpoint and lease, the sweep's progress event. Returns {reply, member id, status, ...}:
# `ok`, `finished`, `fenced` or `gap` (then the group's stored step), and the members no
# longer training (ended now, or cancelled or deleted meanwhile) with their status.
#
# Two scripts share this body (DESIGN "Exactly once per member"). FLUSH_GROUP appends the
# members' rows itself (a flush that WATCH kept refusing falls back to it). COMMIT_GROUP is
# the same bookkeeping without the XADDs: a group's flush sends it last in a MULTI block after
# the members' XADDs, under a WATCH of the records CHECK_GROUP_FLUSH read, so it finds what
# the check found, and the rows it does not append are exactly those the block appended.
_GROUP_FLUSH_BODY = """
local attempt, now = ARGV[2], ARGV[5]
if not owns(attempt) then return {'fenced'} end
local group_status = redis.call('HGET', JOB, 'status')
local done = tonumber(redis.call('HGET', JOB, 'steps_done'))
local first, count = tonumber(ARGV[3]), tonumber(ARGV[4])
local environment = ARGV[9]
local first_of_attempt = environment ~= ''
local n = tonumber(ARGV[10])
local common = {unpack(ARGV, 11, 10 + 2 * n)}
local chunk = count > 0
local last = chunk and first + count - 1 or done - 1
-- A retry of this very flush, whose reply was lost: it was applied already.
local applied = chunk and done == last + 1
if TERMINAL[group_status] then
  if applied then return {'finished'} end
  return {'fenced'}
end
if chunk and not applied and first ~= done then return {'gap', tostring(done)} end
if first_of_attempt then record_environment(attempt, environment) end
if group_status == 'queued' then
  take_back(ARGV[1])
  group_status = 'running'
end
local sweep = redis.call('HGET', JOB, 'sweep')
local record = sweep_key(sweep)
if redis.call('HGET', record, 'status') == 'queued' then
  set_sweep_status(sweep, 'queued', 'running')
  redis.call('HSET', record, 'started_at', now)
  sweep_event(sweep, 'status', 'running')
end
local worker = redis.call('HGET', JOB, 'worker') or ''
local env_field, stepper = ENVIRONMENT .. attempt, redis.call('HGET', JOB, 'stepper')
local gone, progress, ending, passed, moved, member_steps = {}, {}, {}, 0, false, 0
local h = 11 + 2 * n
local function list(at)
  local values = {}
  for value in string.gmatch(ARGV[at], '%S+') do values[#values + 1] = value end
  return values
end
local ids, kepts, losses, val_losses = list(h), list(h + 1), list(h + 2), list(h + 3)
local endings = {}
local e = tonumber(ARGV[h + 4])
for j = 0, e - 1 do
  local b = h + 5 + 4 * j
  endings[tonumber(ARGV[b])] = {ARGV[b + 1], ARGV[b + 2], ARGV[b + 3]}
end
local rows_at = h + 5 + 4 * e - 1  -- member i's rows: ARGV[rows_at + i] (FLUSH_GROUP)
local group = use_job(ARGV[1])
for i, id in ipairs(ids) do
  passed = passed + 1
  local kept = tonumber(kepts[i])
  local action, result, failure = '', '', ''
  if endings[i] then action, result, failure = endings[i][1], endings[i][2], endings[i][3] end
  local loss, val_loss = losses[i], val_losses[i]
  if loss == '-' then loss = '' end
  if val_loss == '-' then val_loss = '' end
  -- The member's record only: its other keys are named where a helper needs them (set_status
  -- writes its events; the ends below point at all of them). Five key names a member cost a
  -- thousand members' flush a quarter of its bookkeeping.
  JOB = job_key(id)
  local status = redis.call('HGET', JOB, 'status')
  if not status or TERMINAL[status] then
    table.insert(gone, id)
    table.insert(gone, status or 'deleted')
  else
    -- A member's attempt, worker, stepper and environments are its group's (set with each
    -- attempt's first flush: a member's JobView shows the attempts that trained it).
    if first_of_attempt then
      redis.call('HSET', JOB, 'attempt', attempt, 'worker', worker, env_field, environment,
                 'stepper', stepper)
    end
    if chunk and not applied and kept > 0 then
      if ROWS_HERE then
        redis.call('XADD', steps_key(id), entry_id(first + kept - 1), FIELD_COUNT, kept,
                   FIELD_ROWS, ARGV[rows_at + i], unpack(common))
      end
      redis.call('HSET', JOB, 'steps_done', first + kept, 'loss', loss)
      if val_loss ~= '' then redis.call('HSET', JOB, 'val_loss', val_loss) end
      member_steps = member_steps + kept
    end
    if status == 'queued' then
      if redis.call('HEXISTS', JOB, 'started_at') == 0 then
        redis.call('HSET', JOB, 'started_at', now)
      end
      use_job(id)
      set_status(id, status, 'running')
      status = 'running'
    end
    local ends = nil
    if action ~= '' and not applied then
      if result ~= '' then redis.call('HSET', JOB, 'result', result) end
      if failure ~= '' then redis.call('HSET', JOB, 'error', failure) end
      ends = action
    elseif status == 'cancelling' then
      ends = 'cancelled'
    end
    if ends then
      table.insert(ending, {id, status, ends})
      table.insert(gone, id)
      table.insert(gone, ends)
    end
    local step = done - 1
    if chunk then step = first + kept - 1 end
    progress[id] = {step = step, loss = tonumber(loss) or cjson.null, status = ends or status}
    if val_loss ~= '' then progress[id].val_loss = tonumber(val_loss) end
    moved = true
  end
end
-- The progress event goes first: the last member to end ends the sweep (its `done` event).
if moved and not applied then
  sweep_event(sweep, 'progress', cjson.encode({members = progress}))
end
local pruned = 0
for _, e in ipairs(ending) do
  use_job(e[1])
  finish(e[1], e[2], e[3], now)
  if e[3] == 'pruned' then pruned = pruned + 1 end
end
restore_job(group)
-- A cut at a rung (the chunk ends at it): the group keeps `<rung>:<ranked>:<kept>` in its
-- `halving` field, so that its sweep's view shows that each group ranked on its own.
if pruned > 0 and chunk and not applied then
  local kept = passed - #gone / 2
  local cut = (last + 1) .. ':' .. (kept + pruned) .. ':' .. kept
  local before = redis.call('HGET', JOB, 'halving')
  redis.call('HSET', JOB, 'halving', before and (before .. ' ' .. cut) or cut)
end
if chunk and not applied then
  redis.call('HINCRBY', STATS, 'steps', count * passed)
  redis.call('HINCRBY', STATS, 'member_steps', member_steps)
  redis.call('HINCRBY', STATS, 'flushes', 1)
  redis.call('HSET', JOB, 'steps_done', last + 1)
  redis.call('HSET', CKPT, 'step', last + 1, 'theta', ARGV[7], 'optimizer', '', 'loss', '')
end
if ARGV[8] == '1' or passed - #gone / 2 <= 0 then
  finish(ARGV[1], group_status, 'succeeded', now)
  table.insert(gone, 1, 'finished')
  return gone
end
redis.call('SET', LEASE, attempt, 'PX', ARGV[6])
table.insert(gone, 1, 'ok')
return gone
"""
FLUSH_GROUP = _script("\nlocal ROWS_HERE = true" + _GROUP_FLUSH_BODY)
COMMIT_GROUP = _script("\nlocal ROWS_HERE = false" + _GROUP_FLUSH_BODY)

# KEYS: the group's record. ARGV: attempt, first step, steps in the chunk, the member ids of
# the flush (space-separated). Read-only, run under the WATCH that COMMIT_GROUP's MULTI block
# commits: which members that block appends a row to, one character each: '1' (append: the
# attempt owns the group, the chunk follows its stored steps, the member exists and runs or
# is being cancelled), '2' (append, and the member is queued: a cancel may end it without
# touching the group's record, so its record must be watched too) or '0' (it ended or was
# deleted); or '' when the block appends none (fenced, ended, a gap, a retry of an applied
# flush, no chunk: the commit script's reply says which). The same conditions as the body
# above, which decides the same from the same records.
CHECK_GROUP_FLUSH = _script(
    """
local attempt, first, count = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if count <= 0 or not owns(attempt) then return '' end
if TERMINAL[redis.call('HGET', JOB, 'status')] then return '' end
if tonumber(redis.call('HGET', JOB, 'steps_done')) ~= first then return '' end
local live = {}
for id in string.gmatch(ARGV[4], '%S+') do
  local status = redis.call('HGET', job_key(id), 'status')
  if status == 'queued' then
    live[#live + 1] = '2'
  elseif status and not TERMINAL[status] then
    live[#live + 1] = '1'
  else
    live[#live + 1] = '0'
  end
end
return table.concat(live)
""",
    flags="no-writes",
)

# KEYS: the sweep's record. ARGV: sweep id, now. Cancels every unfinished member: a queued one
# at once, a running one at its group's next flush. {'ok'}, {'missing'} or {'finished', status}.
CANCEL_SWEEP = _script(
    """
local sweep, now = ARGV[1], ARGV[2]
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
if status ~= 'queued' and status ~= 'running' then return {'finished', status} end
redis.call('HSET', KEYS[1], 'cancel', '1')
for _, id in ipairs(redis.call('ZRANGE', sweep_members_key(sweep), 0, -1)) do
  local saved = use_job(id)
  local current = redis.call('HGET', JOB, 'status')
  if current == 'queued' then
    finish(id, current, 'cancelled', now)
  elseif current == 'running' then
    set_status(id, current, 'cancelling')
  end
  restore_job(saved)
end
-- A group still queued has nothing left to train: it ends now (its message, when a worker
-- takes it, finds it finished).
for id in string.gmatch(redis.call('HGET', KEYS[1], 'groups') or '', '%S+') do
  local saved = use_job(id)
  if redis.call('HGET', JOB, 'status') == 'queued' then finish(id, 'queued', 'cancelled', now) end
  restore_job(saved)
end
return {'ok'}
""",
    allow_oom=True,
)

# KEYS: the sweep's record. ARGV: sweep id, '1' to delete whatever its status (a sweep that
# could not be enqueued). Removes the sweep, its members (as DELETE removes a job), its groups,
# the datasets it owns and its idempotency key; the tenant gets the bytes back. {'deleted',
# the URLs of its archived members' files...}, {'missing'} or {'live', status}.
DELETE_SWEEP = _script(
    """
local sweep = ARGV[1]
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
if (status == 'queued' or status == 'running') and ARGV[2] ~= '1' then
  return {'live', status}
end
local tenant = redis.call('HGET', KEYS[1], 'tenant')
local freed = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0')
local reply = {'deleted'}
for _, id in ipairs(redis.call('ZRANGE', sweep_members_key(sweep), 0, -1)) do
  local member = redis.call('HMGET', job_key(id), 'status', 'bytes', 'archived')
  remove_archived(member[3], reply)
  if member[1] then
    redis.call('ZREM', tenant_index(tenant), id)
    redis.call('ZREM', tenant_index(tenant, member[1]), id)
    redis.call('ZREM', JOBS_INDEX, id)
    redis.call('ZREM', MEMBER_INDEX .. member[1], id)
    redis.call('ZREM', STATUS_INDEX .. member[1], id)  -- stored before members had an index
    if not TERMINAL[member[1]] then redis.call('DECR', tenant_active_members(tenant)) end
    redis.call('ZREM', ARCHIVE_DUE, id)
    freed = freed + tonumber(member[2] or '0')
  end
  redis.call('DEL', job_key(id), steps_key(id), events_key(id), lease_key(id), ckpt_key(id))
end
for id in string.gmatch(redis.call('HGET', KEYS[1], 'groups') or '', '%S+') do
  local group_status = redis.call('HGET', job_key(id), 'status')
  if group_status then redis.call('ZREM', GROUP_INDEX .. group_status, id) end
  redis.call('DEL', job_key(id), steps_key(id), events_key(id), lease_key(id), ckpt_key(id))
end
-- The datasets it owns (its inline data) are counted in its own bytes.
for dataset in string.gmatch(redis.call('HGET', KEYS[1], 'owned') or '', '%S+') do
  redis.call('DEL', dataset_key(dataset))
end
release_datasets(tenant, sweep, redis.call('HGET', KEYS[1], 'datasets'))
redis.call('DECRBY', tenant_storage(tenant), freed)
redis.call('ZREM', tenant_sweeps(tenant), sweep)
redis.call('SREM', tenant_active_sweeps(tenant), sweep)
redis.call('SREM', SWEEP_STATUS .. status, sweep)
local idem = redis.call('HGET', KEYS[1], 'idempotency')
if idem and redis.call('GET', idem) == sweep then redis.call('DEL', idem) end
redis.call('DEL', KEYS[1], sweep_events_key(sweep), sweep_members_key(sweep),
           sweep_finals_loss(sweep), sweep_finals_val_loss(sweep))
return reply
""",
    allow_oom=True,
)


# KEYS: the job's keys. ARGV: job id, then its status, attempt and steps_done as the archiver
# read them before writing the file, then the `archived` value (services/archive.py's
# ArchivedFile as JSON). Called only once the file is written, read back, verified and in
# place: if the job is unchanged and its stream ends at its last step, marks it archived and
# deletes its stream, and its status events too (only a live job's tail reads them; a
# stream's first node alone takes ~5 kB, more than the rest of a finished job). Returns 'ok',
# 'archived' (already), 'missing' (deleted meanwhile: the file joins the files to remove, and
# is the caller's to remove first) or
# 'changed' (nothing done; a later pass tries again). Allowed on a full Redis: it frees the
# streams.
ARCHIVE = _script(
    """
local record = redis.call('HMGET', JOB, 'status', 'attempt', 'steps_done', 'archived')
if not record[1] or record[4] then
  redis.call('ZREM', ARCHIVE_DUE, ARGV[1])
  if record[4] then return 'archived' end
  remove_archived(ARGV[5], {})
  return 'missing'
end
if not TERMINAL[record[1]] or record[1] ~= ARGV[2] or record[2] ~= ARGV[3]
   or record[3] ~= ARGV[4] then
  return 'changed'
end
local last = redis.call('XREVRANGE', STEPS, '+', '-', 'COUNT', 1)[1]
if not last or last[1] ~= entry_id(tonumber(ARGV[4]) - 1) then return 'changed' end
redis.call('HSET', JOB, 'archived', ARGV[5])
redis.call('DEL', STEPS, EVENTS)
redis.call('ZREM', ARCHIVE_DUE, ARGV[1])
return 'ok'
""",
    allow_oom=True,
)

# KEYS: the job's archiving key. ARGV: its TTL in seconds, the claimant's token. Takes the
# job's archiving for this claimant unless another holds it (1) or not (0). Allowed on a full
# Redis, like every write of the archiver's: archiving is what makes room.
CLAIM_ARCHIVING = _script(
    """
return redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', ARGV[1]) and 1 or 0
""",
    allow_oom=True,
    helpers=False,
)

# KEYS: the job's archiving key. ARGV: the claimant's token. Ends the claim if it is still
# this claimant's (1), else leaves whoever took it over holding it (0). Allowed on a full Redis.
RELEASE_ARCHIVING = _script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""",
    allow_oom=True,
    helpers=False,
)

# KEYS: the due index (or the files to remove). ARGV: job id (or file URL), when to try it
# again (Redis seconds). A job whose archiving failed (a file whose removal failed) waits, if
# it is still there. Allowed on a full Redis (it replaces a score).
DEFER_ARCHIVE = _script(
    """
return redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
""",
    allow_oom=True,
    helpers=False,
)

# KEYS: the due index, the mark of a finished backfill. ARGV: '1' on the backfill's last call,
# then (finished at, job id) pairs: jobs finished before archiving existed become due, unless
# they are already. Allowed on a full Redis: archiving them is what makes room.
BACKFILL_DUE = _script(
    """
local added = 0
if #ARGV > 1 then added = redis.call('ZADD', KEYS[1], 'NX', unpack(ARGV, 2)) end
if ARGV[1] == '1' then redis.call('SET', KEYS[2], '1') end
return added
""",
    allow_oom=True,
    helpers=False,
)
