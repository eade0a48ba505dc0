-- One operation of the memory store, atomically (Redis runs a script alone). Shared by
-- every worker. KEYS[1] is the key prefix, with a {hash tag} so that all keys of one
-- prefix live in one Redis Cluster slot. ARGV: op, now (s), ttl, max_turns,
-- max_conversations, max_bytes, max_keys, max_ids, base (what this conversation costs the
-- budget before its turns and keys; turn and key costs come in their sizes), trimmed ('1':
-- return the turns that leave the window uncovered), convo_cost and id_byte_cost (what
-- base is made of, for another conversation's), then the op's own arguments.
-- Returns {result, evictions, counts, trimmed, receipt, held}; evictions are {convo, reason,
-- turns, keys}; trimmed is {} or {summary upto, born, entry, ...}. A trim announced is kept
-- in the outbox until a worker says the broker has its event (op 'delivered'): the hash ob,
-- by receipt (0: none kept), holds msgpack {convo, now, summary upto, born, entry, ...}, the
-- sorted set ob_at when it was kept or last claimed; 'expire' claims those older than its
-- ARGV[14] seconds (a worker killed before their events left) and returns them in held as
-- {receipt, entry, ...}. A conversation's meta hash holds seq,
-- nbytes, sbytes (state and summary: what dropping turns cannot free), nkeys, born (Unix ms
-- when it was started), its summary as sum_text, sum_upto, sum_tokens, sum_size, used
-- (the time of its last use) and ibytes (what its remembered request ids cost: in nbytes,
-- and given up before its turns). The sorted set ix holds every conversation's id with score 0,
-- for listing in id order (ZRANGEBYLEX). A conversation deleted by a request while its ids
-- matter, or evicted for room (LRU, max_bytes) with ids, leaves a grave (worker/store.py's
-- Grave): its ids in gi: and gil:, its cost in the hash gb (in bytes), the time it was dug
-- (of the delete, or the evicted conversation's last use) in the sorted set gv; the
-- conversation started again takes the ids back.
local K = KEYS[1]
local op = ARGV[1]
local now = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local max_turns = tonumber(ARGV[4])
local max_convos = tonumber(ARGV[5])
local max_bytes = tonumber(ARGV[6])
local max_keys = tonumber(ARGV[7])
local max_ids = tonumber(ARGV[8])
local base = tonumber(ARGV[9])
local announce = ARGV[10] == '1'
local convo_cost = tonumber(ARGV[11])
local id_byte_cost = tonumber(ARGV[12])
local ev = {}
local tr = {}
local held = {}

local function num(v) return tonumber(v) or 0 end
local function meta(c) return K .. 'm:' .. c end

local function drop_key(c, field)
  local value = redis.call('HGET', K .. 's:' .. c, field)
  if not value then return end
  local size = string.len(value) + num(redis.call('HGET', K .. 'sk:' .. c, field))
  redis.call('HDEL', K .. 's:' .. c, field)
  redis.call('HDEL', K .. 'sk:' .. c, field)
  if redis.call('HDEL', K .. 'sd:' .. c, field) == 1 then
    redis.call('ZREM', K .. 'kd', c .. '\0' .. field)
  end
  redis.call('HINCRBY', meta(c), 'nbytes', -size)
  redis.call('HINCRBY', meta(c), 'sbytes', -size)
  redis.call('HINCRBY', meta(c), 'nkeys', -1)
  redis.call('DECRBY', K .. 'bytes', size)
  redis.call('DECRBY', K .. 'keys', 1)
end

local function drop_grave(c)
  redis.call('DECRBY', K .. 'bytes', num(redis.call('HGET', K .. 'gb', c)))
  redis.call('DEL', K .. 'gi:' .. c, K .. 'gil:' .. c)
  redis.call('ZREM', K .. 'gv', c)
  redis.call('HDEL', K .. 'gb', c)
end

-- at most twice max_conversations graves (worker/store.py's GRAVES_PER_CONVERSATION), less
-- `room`: the oldest go
local function keep_graves(room)
  while redis.call('ZCARD', K .. 'gv') > 2 * max_convos - room do
    drop_grave(redis.call('ZRANGE', K .. 'gv', 0, 0)[1])
  end
end

-- keep the ids of c, evicted for room, while they last (--ttl from its last use), as a
-- grave as old as c was: the budget loop that evicted it sees it next, costing no more
local function fall(c, used, ibytes)
  if not used or (ttl > 0 and tonumber(used) + ttl <= now) then return end
  if redis.call('EXISTS', K .. 'i:' .. c, K .. 'il:' .. c) < 2 then return end
  if redis.call('ZSCORE', K .. 'gv', c) then drop_grave(c) end  -- left by a worker of before
  if redis.call('ZCARD', K .. 'gv') >= 2 * max_convos then
    local oldest = redis.call('ZRANGE', K .. 'gv', 0, 0, 'WITHSCORES')
    if tonumber(used) < tonumber(oldest[2]) then return end  -- the oldest: it goes
  end
  keep_graves(1)
  local cost = convo_cost + id_byte_cost * string.len(c) + ibytes
  redis.call('RENAME', K .. 'i:' .. c, K .. 'gi:' .. c)
  redis.call('RENAME', K .. 'il:' .. c, K .. 'gil:' .. c)
  redis.call('ZADD', K .. 'gv', used, c)
  redis.call('HSET', K .. 'gb', c, cost)
  redis.call('INCRBY', K .. 'bytes', cost)
end

local function evict(c, reason)
  local count = redis.call('LLEN', K .. 't:' .. c)
  local m = redis.call('HMGET', meta(c), 'nbytes', 'nkeys', 'used', 'ibytes')
  for _, field in ipairs(redis.call('HKEYS', K .. 'sd:' .. c)) do
    redis.call('ZREM', K .. 'kd', c .. '\0' .. field)
  end
  if reason == 'lru' or reason == 'memory' then fall(c, m[3], num(m[4])) end
  redis.call('DEL', meta(c), K .. 't:' .. c, K .. 's:' .. c, K .. 'sk:' .. c, K .. 'sd:' .. c,
             K .. 'i:' .. c, K .. 'il:' .. c)
  redis.call('ZREM', K .. 'lru', c)
  redis.call('ZREM', K .. 'dl', c)
  redis.call('ZREM', K .. 'ix', c)
  redis.call('DECRBY', K .. 'bytes', num(m[1]))
  redis.call('DECRBY', K .. 'turns', count)
  redis.call('DECRBY', K .. 'keys', num(m[2]))
  table.insert(ev, {c, reason, count, num(m[2])})
end

local function live(c)
  if not redis.call('ZSCORE', K .. 'lru', c) then return false end
  if ttl > 0 and num(redis.call('ZSCORE', K .. 'dl', c)) <= now then
    evict(c, 'ttl')
    return false
  end
  return true
end

local function touch(c)
  redis.call('ZADD', K .. 'lru', redis.call('INCR', K .. 'tick'), c)
  redis.call('HSET', meta(c), 'used', ARGV[2])
  if ttl > 0 then redis.call('ZADD', K .. 'dl', now + ttl, c) end
end

-- A remembered id's value is its reply, then \0 and what it costs the budget (ids kept by
-- an earlier version have neither and cost nothing: they were not counted).
local function split_reply(v)
  local at = string.find(v, '\0', 1, true)
  if not at then return v, 0 end
  return string.sub(v, 1, at - 1), tonumber(string.sub(v, at + 1)) or 0
end

-- whether c has a grave not past --ttl (one past it goes)
local function grave(c)
  local at = redis.call('ZSCORE', K .. 'gv', c)
  if not at then return false end
  if ttl > 0 and tonumber(at) + ttl <= now then
    drop_grave(c)
    return false
  end
  return true
end

-- the least recently used conversation goes, or a grave dug before its last use (in a full
-- store graves that always went first would not last)
local function over_budget() return num(redis.call('GET', K .. 'bytes')) > max_bytes end
local function fit_one()
  local grave_ = redis.call('ZRANGE', K .. 'gv', 0, 0, 'WITHSCORES')
  local victim = redis.call('ZRANGE', K .. 'lru', 0, 0)[1]
  if grave_[1] and (not victim or
      tonumber(grave_[2]) <= num(redis.call('HGET', meta(victim), 'used'))) then
    drop_grave(grave_[1])
  elseif victim then
    evict(victim, 'memory')
  else
    return false
  end
  return true
end
local function fit_budget()
  while over_budget() and fit_one() do end
end

local function create(c)
  -- its own grave first: the room its start makes must not take it
  if grave(c) and redis.call('EXISTS', K .. 'gi:' .. c, K .. 'gil:' .. c) < 2 then
    drop_grave(c)  -- its ids gone from outside (maxmemory, a DEL): nothing to take back
  end
  local cost = nil
  if grave(c) then
    cost = 0
    for _, v in ipairs(redis.call('HVALS', K .. 'gi:' .. c)) do
      local _, each = split_reply(v)
      cost = cost + each
    end
    redis.call('RENAME', K .. 'gi:' .. c, K .. 'i:' .. c)
    redis.call('RENAME', K .. 'gil:' .. c, K .. 'il:' .. c)
    drop_grave(c)  -- its keys are the conversation's now: DEL finds none
  end
  while redis.call('ZCARD', K .. 'lru') >= max_convos do
    local victim = redis.call('ZRANGE', K .. 'lru', 0, 0)[1]
    local expired = ttl > 0 and num(redis.call('ZSCORE', K .. 'dl', victim)) <= now
    evict(victim, expired and 'ttl' or 'lru')
  end
  -- born: unique in this keyspace, even within one millisecond (worker/store.py)
  local born = math.max(math.floor(now * 1000), num(redis.call('GET', K .. 'born')) + 1)
  redis.call('SET', K .. 'born', string.format('%.0f', born))
  redis.call('HSET', meta(c), 'seq', 0, 'nbytes', base, 'sbytes', 0, 'nkeys', 0,
             'born', string.format('%.0f', born))
  redis.call('ZADD', K .. 'ix', 0, c)
  redis.call('INCRBY', K .. 'bytes', base)
  if cost then
    redis.call('HSET', meta(c), 'nbytes', base + cost, 'ibytes', cost)
    redis.call('INCRBY', K .. 'bytes', cost)
  end
end

-- the reply remembered for id by c when it is live (exists), else by its grave; or nil
local function seen(c, id, exists)
  if id == '' or (not exists and not grave(c)) then return nil end
  local v = redis.call('HGET', K .. (exists and 'i:' or 'gi:') .. c, id)
  if not v then return nil end
  return (split_reply(v))
end

-- whether c is live, and the reply it (or its grave) remembers for id, touching c for a repeat
local function known(c, id)
  local exists = live(c)
  local dup = seen(c, id, exists)
  if dup and exists then touch(c) end
  return exists, dup
end

-- keep c's ids (moved to its grave before a delete) and the delete's, within the bounds
local function bury(c, id, reply, icost)
  local gi, gil = K .. 'gi:' .. c, K .. 'gil:' .. c
  local was = num(redis.call('HGET', K .. 'gb', c))  -- an earlier grave's, counted in bytes
  if id ~= '' then
    redis.call('HSET', gi, id, reply .. '\0' .. icost)
    redis.call('RPUSH', gil, id)
  end
  while redis.call('LLEN', gil) > max_ids do redis.call('HDEL', gi, redis.call('LPOP', gil)) end
  local cost = base
  for _, v in ipairs(redis.call('HVALS', gi)) do
    local _, each = split_reply(v)
    cost = cost + each
  end
  while cost > max_bytes and redis.call('LLEN', gil) > 0 do
    local _, each = split_reply(redis.call('HGET', gi, redis.call('LINDEX', gil, 0)))
    redis.call('HDEL', gi, redis.call('LPOP', gil))
    cost = cost - each
  end
  if redis.call('LLEN', gil) == 0 then
    if was > 0 then drop_grave(c) end
    redis.call('DEL', gi)
    return
  end
  if was == 0 then keep_graves(1) end
  redis.call('ZADD', K .. 'gv', now, c)
  redis.call('HSET', K .. 'gb', c, cost)
  redis.call('INCRBY', K .. 'bytes', cost - was)
  fit_budget()
end

local function forget_id(c)
  local id = redis.call('LPOP', K .. 'il:' .. c)
  local _, cost = split_reply(redis.call('HGET', K .. 'i:' .. c, id) or '')
  redis.call('HDEL', K .. 'i:' .. c, id)
  if cost > 0 then
    redis.call('HINCRBY', meta(c), 'nbytes', -cost)
    redis.call('HINCRBY', meta(c), 'ibytes', -cost)
    redis.call('DECRBY', K .. 'bytes', cost)
  end
end

local function over(c)
  return num(redis.call('HGET', meta(c), 'nbytes')) > max_bytes
end

-- while the conversation alone is over the budget: its ids go before its turns (a cache)
local function shed_ids(c, keep)
  while over(c) and redis.call('LLEN', K .. 'il:' .. c) > keep do forget_id(c) end
end

local function remember(c, id, reply, cost)
  if id == '' then return end
  redis.call('HSET', K .. 'i:' .. c, id, reply .. '\0' .. cost)
  redis.call('RPUSH', K .. 'il:' .. c, id)
  redis.call('HINCRBY', meta(c), 'nbytes', cost)
  redis.call('HINCRBY', meta(c), 'ibytes', cost)
  redis.call('INCRBY', K .. 'bytes', cost)
  while redis.call('LLEN', K .. 'il:' .. c) > max_ids do forget_id(c) end
  shed_ids(c, 0)  -- this one too, when what it stores fills the budget alone
end

local function live_key(c, field)
  local d = redis.call('HGET', K .. 'sd:' .. c, field)
  if d and tonumber(d) <= now then
    drop_key(c, field)
    return nil
  end
  return redis.call('HGET', K .. 's:' .. c, field)
end

local function purge_keys(c)
  local all = redis.call('HGETALL', K .. 'sd:' .. c)
  for i = 1, #all, 2 do
    if tonumber(all[i + 1]) <= now then drop_key(c, all[i]) end
  end
end

local function drop_oldest(c)
  local turn = redis.call('LPOP', K .. 't:' .. c)
  local size = struct.unpack('>I4', turn)
  redis.call('HINCRBY', meta(c), 'nbytes', -size)
  redis.call('DECRBY', K .. 'bytes', size)
  redis.call('DECRBY', K .. 'turns', 1)
  return turn
end

local function trim_oldest(c)
  local turn = drop_oldest(c)
  if announce then
    if #tr == 0 then
      local m = redis.call('HMGET', meta(c), 'sum_upto', 'born')
      tr[1], tr[2] = num(m[1]), m[2] or '0'
    end
    tr[#tr + 1] = turn
  end
end

-- tokens and seq of an entry sit at fixed places from its end (worker/turns.py)
local function entry_seq(e)
  local seq = struct.unpack('>I4', e, #e - 3)
  return seq
end
local function entry_tokens(e)
  if string.byte(e, 5) ~= 0x85 then return math.ceil((#e - 30) / 4) end  -- stored before tokens
  local tokens = struct.unpack('>I4', e, #e - 12)
  return tokens
end

local result
local c = ARGV[13]
if op == 'append' then
  -- ARGV[14] size, ARGV[15] turn without its seq, ARGV[16] id, ARGV[17] the id's cost
  local size, head, id, icost = tonumber(ARGV[14]), ARGV[15], ARGV[16], tonumber(ARGV[17])
  local exists, dup = known(c, id)
  local fixed = base + (exists and num(redis.call('HGET', meta(c), 'sbytes')) or 0)
  if dup then
    result = {'dup', dup}
  elseif size + fixed > max_bytes then
    result = {'too_large', 'the turn (' .. ARGV[14] ..
              ' bytes with its overhead) does not fit in --max-bytes ' .. ARGV[6]}
  else
    if not exists then create(c) end
    local seq = redis.call('HINCRBY', meta(c), 'seq', 1)
    local t = K .. 't:' .. c
    -- the entry layout of worker/turns.py (redis_entry); tests/test_turns.py holds them equal
    redis.call('RPUSH', t, struct.pack('>I4', size) .. head .. struct.pack('>I4', seq))
    redis.call('HINCRBY', meta(c), 'nbytes', size)
    redis.call('INCRBY', K .. 'bytes', size)
    redis.call('INCRBY', K .. 'turns', 1)
    while redis.call('LLEN', t) > max_turns do trim_oldest(c) end
    shed_ids(c, 0)
    while over(c) and redis.call('LLEN', t) > 1 do trim_oldest(c) end
    local count = redis.call('LLEN', t)
    remember(c, id, seq .. ' ' .. count, icost)
    touch(c)
    fit_budget()
    result = {'ok', seq .. ' ' .. count}
  end
elseif op == 'get' then
  -- ARGV[14] last (0: all), ARGV[15] max_tokens (0: no budget), ARGV[16] '1': with summary
  if live(c) then
    touch(c)
    -- a window longer than --max-turns (lowered since it was stored) is trimmed first
    while redis.call('LLEN', K .. 't:' .. c) > max_turns do trim_oldest(c) end
    local last, budget = tonumber(ARGV[14]), tonumber(ARGV[15])
    local turns = redis.call('LRANGE', K .. 't:' .. c, last > 0 and -last or 0, -1)
    local summary = {}
    if ARGV[16] == '1' then
      local s = redis.call('HMGET', meta(c), 'sum_text', 'sum_upto', 'sum_tokens')
      if s[1] then summary = s end
    end
    if budget > 0 then
      budget = budget - num(summary[3])
      local first = #turns + 1
      while first > 1 and entry_tokens(turns[first - 1]) <= budget do
        budget = budget - entry_tokens(turns[first - 1])
        first = first - 1
      end
      local kept = {}
      for i = first, #turns do kept[#kept + 1] = turns[i] end
      turns = kept
    end
    result = {'turns', turns, summary}
  else
    result = {'turns', {}, {}}
  end
elseif op == 'delete' then
  -- ARGV[14] id, ARGV[15] the id's cost
  local id, icost = ARGV[14], tonumber(ARGV[15])
  local exists, dup = known(c, id)
  if dup then
    result = {'dup', dup}
  else
    local count = exists and redis.call('LLEN', K .. 't:' .. c) or 0
    local ids = exists and redis.call('EXISTS', K .. 'il:' .. c, K .. 'i:' .. c) == 2
    if ids then
      if grave(c) then drop_grave(c) end  -- left by a worker of before: the ids are newer
      redis.call('RENAME', K .. 'i:' .. c, K .. 'gi:' .. c)
      redis.call('RENAME', K .. 'il:' .. c, K .. 'gil:' .. c)
    end
    if exists then evict(c, 'deleted') end
    if ids or id ~= '' then bury(c, id, tostring(count), icost) end
    result = {'ok', tostring(count)}
  end
elseif op == 'summary' then
  -- ARGV[14] text, ARGV[15] upto, ARGV[16] base, ARGV[17] tokens, ARGV[18] size, ARGV[19] id,
  -- ARGV[20] born ('': any), ARGV[21] the id's cost
  local text, upto, sbase = ARGV[14], tonumber(ARGV[15]), tonumber(ARGV[16])
  local tokens, size, id, want = ARGV[17], tonumber(ARGV[18]), ARGV[19], ARGV[20]
  local icost = tonumber(ARGV[21])
  local exists, dup = known(c, id)
  local current = exists and num(redis.call('HGET', meta(c), 'sum_upto')) or 0
  local newest = exists and num(redis.call('HGET', meta(c), 'seq')) or 0
  local born = exists and (redis.call('HGET', meta(c), 'born') or '0') or '0'
  local other = want ~= '' and tonumber(want) ~= tonumber(born)
  if dup then
    result = {'dup', dup}
  elseif not exists or other or sbase ~= current or upto <= sbase or upto > newest then
    local why = 'the conversation is not live'
    if exists and other then
      why = 'the conversation was started again (born ' .. born .. ', not ' .. want .. ')'
    elseif exists and sbase ~= current then
      why = "the summary's upto is " .. current .. ', not base ' .. ARGV[16]  -- as sent
    elseif exists and sbase >= newest then
      why = 'nothing to summarize: the summary covers every turn (upto ' ..
            string.format('%.0f', newest) .. ')'
    elseif exists then
      -- digits as sent, not Lua's 1e+17 for a large number
      why = "'upto' must be between " .. string.format('%.0f', sbase + 1) .. ' and ' ..
            string.format('%.0f', newest) ..
            " (after the summary's upto, up to the newest turn), not " .. ARGV[15]
    end
    result = {'conflict', why, current, newest, born}
  else
    local old = num(redis.call('HGET', meta(c), 'sum_size'))
    local t = K .. 't:' .. c
    -- without trimmed events the newest turn stays, as an append's own does (store.py's)
    local last, kept = redis.call('LINDEX', t, -1), 0
    if not announce and last and entry_seq(last) > upto then kept = struct.unpack('>I4', last) end
    if size + base + num(redis.call('HGET', meta(c), 'sbytes')) - old + kept > max_bytes then
      local beside = ''
      if kept > 0 then
        beside = ' beside the newest turn, which it does not cover (' .. kept .. ' bytes)'
      end
      result = {'too_large', 'the summary (' .. size ..
                ' bytes with its overhead) does not fit in --max-bytes ' .. max_bytes .. beside}
    else
      local dropped = 0
      while redis.call('LLEN', t) > 0 and entry_seq(redis.call('LINDEX', t, 0)) <= upto do
        drop_oldest(c)
        dropped = dropped + 1
      end
      redis.call('HSET', meta(c), 'sum_text', text, 'sum_upto', upto, 'sum_tokens', tokens,
                 'sum_size', size)
      redis.call('HINCRBY', meta(c), 'sbytes', size - old)
      redis.call('HINCRBY', meta(c), 'nbytes', size - old)
      redis.call('INCRBY', K .. 'bytes', size - old)
      shed_ids(c, 0)
      local keep = 0
      if kept > 0 then keep = 1 end
      while over(c) and redis.call('LLEN', t) > keep do trim_oldest(c) end
      remember(c, id, upto .. ' ' .. dropped, icost)
      touch(c)
      fit_budget()
      result = {'ok', upto .. ' ' .. dropped}
    end
  end
elseif op == 'save' then
  -- ARGV[14] field, ARGV[15] key size, ARGV[16] value, ARGV[17] key ttl (0: none), ARGV[18] id,
  -- ARGV[19] the id's cost
  local field, ksize, value = ARGV[14], tonumber(ARGV[15]), ARGV[16]
  local kttl, id, icost = tonumber(ARGV[17]), ARGV[18], tonumber(ARGV[19])
  local exists, dup = known(c, id)
  if dup then
    result = {'dup', dup}
  else
    local old = exists and live_key(c, field)
    if exists and not old and num(redis.call('HGET', meta(c), 'nkeys')) >= max_keys then
      purge_keys(c)
    end
    local delta = ksize + string.len(value) - (old and (ksize + string.len(old)) or 0)
    if exists and not old and num(redis.call('HGET', meta(c), 'nkeys')) >= max_keys then
      result = {'too_large', 'the conversation has --max-keys ' .. ARGV[7] .. ' live keys'}
    elseif (exists and num(redis.call('HGET', meta(c), 'nbytes')) -
            num(redis.call('HGET', meta(c), 'ibytes')) or base) + delta > max_bytes then
      result = {'too_large', 'the value does not fit in --max-bytes ' .. ARGV[6]}
    else
      if not exists then create(c) end
      redis.call('HSET', K .. 's:' .. c, field, value)
      redis.call('HSET', K .. 'sk:' .. c, field, ksize)
      if kttl > 0 then
        redis.call('HSET', K .. 'sd:' .. c, field, now + kttl)
        redis.call('ZADD', K .. 'kd', now + kttl, c .. '\0' .. field)
      elseif redis.call('HDEL', K .. 'sd:' .. c, field) == 1 then
        redis.call('ZREM', K .. 'kd', c .. '\0' .. field)
      end
      if not old then
        redis.call('HINCRBY', meta(c), 'nkeys', 1)
        redis.call('INCRBY', K .. 'keys', 1)
      end
      redis.call('HINCRBY', meta(c), 'nbytes', delta)
      redis.call('HINCRBY', meta(c), 'sbytes', delta)
      redis.call('INCRBY', K .. 'bytes', delta)
      shed_ids(c, 0)  -- a save without an id too: else fit_budget evicted its own conversation
      remember(c, id, '', icost)
      touch(c)
      fit_budget()
      result = {'ok', ''}
    end
  end
elseif op == 'load' then
  -- ARGV[14] field, ARGV[15] the key's TTL to start again, if it has one (0, or absent from
  -- workers of before: none)
  if live(c) then
    local field, kttl = ARGV[14], tonumber(ARGV[15]) or 0
    local value = live_key(c, field)
    if value and kttl > 0 and redis.call('HEXISTS', K .. 'sd:' .. c, field) == 1 then
      redis.call('HSET', K .. 'sd:' .. c, field, now + kttl)
      redis.call('ZADD', K .. 'kd', now + kttl, c .. '\0' .. field)
    end
    touch(c)
    result = value and {'value', value} or {'none', ''}
  else
    result = {'none', ''}
  end
elseif op == 'get_all' then
  -- ARGV[14] the namespace's field prefix
  local items = {}
  if live(c) then
    touch(c)
    local prefix = ARGV[14]
    local all = redis.call('HGETALL', K .. 's:' .. c)
    for i = 1, #all, 2 do
      if string.sub(all[i], 1, string.len(prefix)) == prefix and live_key(c, all[i]) then
        table.insert(items, all[i])
        table.insert(items, all[i + 1])
      end
    end
  end
  result = {'items', items}
elseif op == 'state_delete' then
  -- ARGV[14] field, ARGV[15] id, ARGV[16] the id's cost
  local id, icost = ARGV[15], tonumber(ARGV[16])
  local exists, dup = known(c, id)
  if dup then
    result = {'dup', dup}
  else
    local found = false
    if exists then
      found = live_key(c, ARGV[14]) and true or false
      if found then drop_key(c, ARGV[14]) end
      remember(c, id, found and '1' or '', icost)
      touch(c)
      fit_budget()
    elseif id ~= '' then
      bury(c, id, '', icost)
    end
    result = {'ok', found and '1' or ''}
  end
elseif op == 'namespaces' then
  -- a look from outside: expires nothing, touches nothing
  local names, seen = {}, {}
  local alive = redis.call('ZSCORE', K .. 'lru', c)
  if alive and (ttl == 0 or num(redis.call('ZSCORE', K .. 'dl', c)) > now) then
    local deadlines = {}
    local all = redis.call('HGETALL', K .. 'sd:' .. c)
    for i = 1, #all, 2 do deadlines[all[i]] = tonumber(all[i + 1]) end
    for _, field in ipairs(redis.call('HKEYS', K .. 's:' .. c)) do
      if (deadlines[field] or now + 1) > now then
        local ns = string.sub(field, 3, 2 + struct.unpack('>I2', field))
        if not seen[ns] then
          seen[ns] = true
          names[#names + 1] = ns
        end
      end
    end
  end
  result = {'names', names}
elseif op == 'list' then
  -- ARGV[13], ARGV[14] the ZRANGEBYLEX bounds, ARGV[15] limit. Scans limit ids in id order;
  -- returns {'list', rows, more} with a row {id} for one expired but not yet swept, else
  -- {id, 1, turns, keys, used, summary upto, tokens}. A look from outside: touches nothing.
  local limit = tonumber(ARGV[15])
  local ids = redis.call('ZRANGEBYLEX', K .. 'ix', ARGV[13], ARGV[14], 'LIMIT', 0, limit + 1)
  local rows = {}
  for i = 1, math.min(limit, #ids) do
    local id = ids[i]
    local dl = num(redis.call('ZSCORE', K .. 'dl', id))
    if ttl > 0 and dl <= now then
      rows[i] = {id}
    else
      local m = redis.call('HMGET', meta(id), 'used', 'nkeys', 'sum_upto', 'sum_tokens')
      local turns = redis.call('LRANGE', K .. 't:' .. id, 0, -1)
      local tokens = num(m[4])
      for _, e in ipairs(turns) do tokens = tokens + entry_tokens(e) end
      local used = m[1] or (ttl > 0 and tostring(dl - ttl)) or '0'
      rows[i] = {id, 1, #turns, num(m[2]), used, num(m[3]), tokens}
    end
  end
  result = {'list', rows, #ids > limit and '1' or ''}
elseif op == 'expire' then
  -- ARGV[13] limit
  local limit = tonumber(ARGV[13])
  local done = 0
  if ttl > 0 then
    for _, due in ipairs(redis.call('ZRANGEBYSCORE', K .. 'dl', '-inf', now, 'LIMIT', 0, limit)) do
      evict(due, 'ttl')
      done = done + 1
    end
  end
  if ttl > 0 then
    for _, dug in ipairs(redis.call('ZRANGEBYSCORE', K .. 'gv', '-inf', now - ttl, 'LIMIT', 0, limit)) do
      drop_grave(dug)
      done = done + 1
    end
  end
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', K .. 'kd', '-inf', now, 'LIMIT', 0, limit)) do
    local sep = string.find(member, '\0', 1, true)
    drop_key(string.sub(member, 1, sep - 1), string.sub(member, sep + 1))
    redis.call('ZREM', K .. 'kd', member)
    done = done + 1
  end
  -- limits lowered since the data was stored (a restart with lower flags): a chunk a sweep
  while done < limit and redis.call('ZCARD', K .. 'lru') > max_convos do
    local victim = redis.call('ZRANGE', K .. 'lru', 0, 0)[1]
    local expired = ttl > 0 and num(redis.call('ZSCORE', K .. 'dl', victim)) <= now
    evict(victim, expired and 'ttl' or 'lru')
    done = done + 1
  end
  while done < limit and over_budget() and fit_one() do done = done + 1 end
  local stale = tonumber(ARGV[14])
  if stale then
    local old = redis.call('ZRANGEBYSCORE', K .. 'ob_at', '-inf', now - stale, 'LIMIT', 0, limit)
    for _, r in ipairs(old) do
      local entry = redis.call('HGET', K .. 'ob', r)
      if entry then
        redis.call('ZADD', K .. 'ob_at', now, r)  -- claimed: the other sweeps leave it a while
        held[#held + 1] = r
        held[#held + 1] = entry
      else
        redis.call('ZREM', K .. 'ob_at', r)
      end
    end
  end
  -- and the earliest deadline left ('' when none), for the sweep to sleep until
  local first = ''
  for _, zset in ipairs({'dl', 'kd', 'gv'}) do
    local head = redis.call('ZRANGE', K .. zset, 0, 0, 'WITHSCORES')
    local at = head[2] and tonumber(head[2]) + (zset == 'gv' and ttl or 0)
    if at and (zset ~= 'gv' or ttl > 0) and (first == '' or at < tonumber(first)) then
      first = string.format('%.17g', at)
    end
  end
  result = {'more', done >= limit and '1' or '', first}
elseif op == 'delivered' then
  -- ARGV[13]... the receipts of events the broker has
  for i = 13, #ARGV do
    redis.call('HDEL', K .. 'ob', ARGV[i])
    redis.call('ZREM', K .. 'ob_at', ARGV[i])
  end
end

if op == 'counts' and redis.call('EXISTS', K .. 'ix') == 0 then
  -- data stored before listing existed: index its conversations once
  local ids = redis.call('ZRANGE', K .. 'lru', 0, -1)
  for i = 1, #ids, 1000 do
    local args = {}
    for j = i, math.min(i + 999, #ids) do
      args[#args + 1] = 0
      args[#args + 1] = ids[j]
    end
    redis.call('ZADD', K .. 'ix', unpack(args))
  end
end
if result == nil then result = {'ok', ''} end  -- 'counts': nothing but the counts
local receipt = 0
if #tr > 0 then
  receipt = redis.call('INCR', K .. 'ob_n')
  local entry = {c, ARGV[2]}
  for i = 1, #tr do entry[#entry + 1] = tr[i] end
  redis.call('HSET', K .. 'ob', receipt, cmsgpack.pack(entry))
  redis.call('ZADD', K .. 'ob_at', now, receipt)
end
local counts = redis.call('MGET', K .. 'turns', K .. 'bytes', K .. 'keys')
return {result, ev, {redis.call('ZCARD', K .. 'lru'), num(counts[1]), num(counts[2]),
                     num(counts[3])}, tr, receipt, held}
