"""Redis backend: every decision is one Lua script, so replicas never race.

Keys (all here, one place); `{account}` is a hash tag so one account's keys share a cluster slot:
    smsgw:{<account>}:d:<unique_id>   dedupe record (JSON: s=state, o=owner, l=lease ms, r=result)
    smsgw:{<account>}:epoch           store epoch (hash: id, since=ms, lost=0|1), never expires
    smsgw:rl:{<key>}                  token bucket (hash: tk=tokens, ts=seconds; while throttled
                                      f=factor at the last cut, fc=its time)

    smsgw:{<account>}:c:<message id>  correlation of an accepted message (hash: r=record JSON,
                                      s=open|claim|final, o=claim owner, l=lease ms, n=polls)
    smsgw:{<account>}:dlr:due         zset: message id -> next status poll (epoch s)
    smsgw:{<account>}:dlr:open        zset: message id -> acceptance time, until its final event
    smsgw:{<account>}:dlr:early       hash: message id -> [until, report] of a webhook that came before
                                      its correlation (at most `park_max`)
    smsgw:{<account>}:dlr:ev:<id>     a webhook event id -> the message id it first named

    smsgw:{<account>}:q:<counter>     a limit's count in one period (core/budgets.py: the counter's
                                      name), expiring a while after the period ends
    smsgw:{<account>}:h:<unique_id>   a claimed request's draws: counter key=amount|...

    smsgw:optout:{<scope>}            opt-out registry of an account, or `*` for all: hash
                                      E.164 number -> JSON (at, via, source, by), never expires

Time is the Redis server's (one clock for every replica) unless a `Clock` is injected (tests).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Collection, Mapping, Sequence
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions

from gateway.clock import Clock
from gateway.contract import REPLAYABLE
from gateway.errors import StoreRefused, StoreUnavailable, tls_failure
from gateway.state.base import (
    HOLDER,
    LANE_DEMAND_MARGIN_S,
    LOWEST_RANK,
    NORMAL_RANK,
    NOTHING,
    OPTOUT_ALL,
    THROTTLE_COOLDOWN_S,
    THROTTLE_MIN_FACTOR,
    THROTTLE_RECOVERY_PER_S,
    AccountState,
    BatchRecord,
    Budget,
    BudgetAsk,
    BudgetCounter,
    Claim,
    ClaimState,
    Delivery,
    Epoch,
    EpochMemory,
    FinalState,
    Grant,
    OptOut,
    Pause,
    RecordShortcuts,
    RetryNote,
    StoredResult,
    Tracked,
    Trail,
    WebhookHint,
    distrust_new,
    note_budget_use,
)

PREFIX = "smsgw"
# A bucket outlives a throttle: it keeps its factor until the factor is back at 1.
_HOLD_S = (1 - THROTTLE_MIN_FACTOR) / THROTTLE_RECOVERY_PER_S


def dedupe_key(account: str, uid: str) -> str:
    return f"{PREFIX}:{{{account}}}:d:{uid}"


def epoch_key(account: str) -> str:
    return f"{PREFIX}:{{{account}}}:epoch"


def corr_key(account: str, message_id: str) -> str:
    return f"{PREFIX}:{{{account}}}:c:{message_id}"


def trail_key(account: str, uid: str) -> str:
    return f"{PREFIX}:{{{account}}}:t:{uid}"


def number_key(account: str, hour: int) -> str:
    """The hour's index of stored results by recipient (hour = epoch seconds // 3600)."""
    return f"{PREFIX}:{{{account}}}:n:{hour}"


def dlr_key(account: str, name: str) -> str:
    return f"{PREFIX}:{{{account}}}:dlr:{name}"


def pause_key(account: str) -> str:
    return f"{PREFIX}:{{{account}}}:pause"


def bucket_key(key: str) -> str:
    return f"{PREFIX}:rl:{{{key}}}"


def hold_key(account: str, uid: str) -> str:
    """A claimed request's draws: `counter key=amount|...` (see _CLAIM_FN)."""
    return f"{PREFIX}:{{{account}}}:h:{uid}"


def budget_key(account: str, counter: str) -> str:
    return f"{PREFIX}:{{{account}}}:q:{counter}"


def _flags(uids: list[str], replay: Collection[str], untokened: Collection[str]) -> str:
    """One character per id for the claim script: 0 plain, 1 replay, 2 no token (another account
    sends it), 3 both; "" when every id is plain."""
    if not replay and not untokened:
        return ""
    return "".join(str((u in replay) + 2 * (u in untokened)) for u in uids)


def _ask(ask: BudgetAsk | None) -> str:
    if ask is None:
        return ""
    return ",".join(f"{d.counter + 1}:{d.amount}:{1 if d.enforced else 0}" for d in ask.draws)


def optout_key(scope: str) -> str:
    return f"{PREFIX}:optout:{{{scope}}}"


_OPTOUT_CHUNK = 1000  # fields per HSET / HDEL of an import


# now(arg): the script's time in seconds; the server's clock unless the caller passed one (tests).
_NOW_FN = """
local function clock(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# claim(n, ...): claims KEYS[1..n]; returns, per key, {state, result-json} ({'busy', owner, lease
# ms left} for another live claim, {'quota', counter index} for one its budget had no room for),
# and how many are new.
# `replay` holds one character per key: '1' claims a done result again when its status is replayable.
# `b` is the batch's limits (`budget_of`), or nil: a new claim draws from its counters first
# (refused when an enforced draw has no room), and keeps its draws in its hold key KEYS[n + i]
# (`counter key=amount|...`) until the record step spends or refunds them.
_CLAIM_FN = f"""
local replayable = {{{", ".join(f"['{s}'] = true" for s in sorted(REPLAYABLE))}}}
local function room(b, ask)
  for _, d in ipairs(ask) do
    if d.e and b.used[d.c] + d.a > b.limit[d.c] then return d.c end
  end
  return nil
end
local function draw(b, n, i, ask, window)
  local hold = {{}}
  for _, d in ipairs(ask) do
    local key = KEYS[2 * n + d.c]
    b.used[d.c] = redis.call('INCRBY', key, d.a)
    if b.used[d.c] == d.a then redis.call('PEXPIREAT', key, b.till[d.c]) end
    hold[#hold + 1] = key .. '=' .. d.a
  end
  redis.call('SET', KEYS[n + i], table.concat(hold, '|'), 'PX', window)
end
local function claim(n, owner, lease, window, now_s, replay, b)
  local now = math.floor(now_s * 1000)
  local out, fresh = {{}}, 0
  for i = 1, n do
    local key = KEYS[i]
    local raw = redis.call('GET', key)
    local mine = cjson.encode({{s = 'inflight', o = owner, l = now + lease}})
    local ask = b and b.ask[i]
    if not raw then
      local full = ask and room(b, ask)
      if full then
        out[i] = {{'quota', full}}
      else
        if ask then draw(b, n, i, ask, window) end
        redis.call('SET', key, mine, 'PX', window)
        out[i] = {{'new', ''}}
        if string.byte(replay, i) == nil or string.byte(replay, i) < 50 then fresh = fresh + 1 end
      end
    else
      local rec = cjson.decode(raw)
      local again = false
      local flag = string.sub(replay, i, i)
      if rec.s == 'done' and (flag == '1' or flag == '3') and replayable[cjson.decode(rec.r).status] then
        again = true
      elseif rec.s == 'done' then
        out[i] = {{'done', rec.r}}
      elseif rec.s == 'inflight' and tonumber(rec.l) > now then
        out[i] = {{'busy', rec.o or '', tonumber(rec.l) - now}}
      else
        again = true
      end
      if again then
        -- it may have been sent: counted when it holds nothing yet, never refused
        if ask and redis.call('EXISTS', KEYS[n + i]) == 0 then draw(b, n, i, ask, window) end
        redis.call('SET', key, mine, 'PX', window)
        out[i] = {{'reconcile', ''}}
      end
    end
  end
  return out, fresh
end
"""

# The batch's limits from ARGV[12] on: m counters (their limits, then their expiry times in ms),
# then one ask per id: '' (draws nothing) or 'counter:amount:enforced 0|1,...'. Returns nil when m
# is 0, and the number of claimed ids n from the key count.
_BUDGET_FN = """
local function budget_of(nkeys)
  local m = tonumber(ARGV[12] or '0')
  if m == 0 then return nil, nkeys - 2 end
  local n = (nkeys - 2 - m) / 2
  local b = {limit = {}, till = {}, used = {}, ask = {}}
  for c = 1, m do
    b.limit[c] = tonumber(ARGV[12 + c])
    b.till[c] = tonumber(ARGV[12 + m + c])
    b.used[c] = tonumber(redis.call('GET', KEYS[2 * n + c]) or '0')
  end
  for i = 1, n do
    local spec = ARGV[12 + 2 * m + i]
    if spec ~= '' then
      local draws = {}
      for c, a, e in string.gmatch(spec, '(%d+):(%d+):([01])') do
        draws[#draws + 1] = {c = tonumber(c), a = tonumber(a), e = e == '1'}
      end
      b.ask[i] = draws
    end
  end
  return b, n
end
"""

# The bucket hash: tk = tokens, ts = seconds of the last update, and while the provider throttles
# f = the factor set by the last cut, fc = the time of that cut (state.base: THROTTLE_*).
_FACTOR_FN = f"""
local function factor(f, fc, now)
  if not f then return 1 end
  return math.min(1, tonumber(f) + math.max(0, now - tonumber(fc)) * {THROTTLE_RECOVERY_PER_S})
end
"""

# take(bucket, rate per s, burst, wanted, now, rank, min share): token bucket at rate x factor, burst
# x factor, for the lane of `rank` (state.base: LANE_DEMAND_MARGIN_S). Lane fields of the bucket
# hash: d0, d1 = demand marks of the urgent and normal lanes (until, seconds); k1, t1 and k2, t2 =
# the share buckets of the normal and bulk lanes (tokens, seconds of the last update).
# Returns granted, seconds until 1 more, and the factor.
_TAKE_FN = f"""
local function take(bucket, rate, burst, want, now, rank, share)
  local st = redis.call('HMGET', bucket, 'tk', 'ts', 'f', 'fc', 'd0', 'd1', 'k1', 't1', 'k2', 't2')
  local f = factor(st[3], st[4], now)
  local r = rate * f
  local b = math.max(1, math.floor(burst * f + 0.5))
  local tokens = tonumber(st[1]) or b
  local ts = tonumber(st[2]) or now
  tokens = math.min(b, tokens + math.max(0, now - ts) * r)
  local above = false
  for h = 0, rank - 1 do
    local d = tonumber(st[5 + h])
    if d and d > now then above = true end
  end
  local grant, wait = 0, 0
  if above then
    -- the share is carved out of the rate: granted even when the higher lane emptied the bucket,
    -- which then runs below zero and pays it back from the refill
    local sr = r * share
    local sb = math.max(1, math.floor(burst * f * share + 0.5))
    local sk = tonumber(st[5 + rank * 2]) or sb
    local stt = tonumber(st[6 + rank * 2]) or now
    sk = math.min(sb, sk + math.max(0, now - stt) * sr)
    if sr > 0 then grant = math.min(want, math.floor(sk + sr * 1e-6)) end
    sk = sk - grant
    if sr <= 0 then wait = {LANE_DEMAND_MARGIN_S} elseif sk < 1 then wait = (1 - sk) / sr end
    redis.call('HSET', bucket, 'k' .. rank, tostring(sk), 't' .. rank, tostring(now))
    tokens = tokens - grant
  else
    grant = math.min(want, math.floor(tokens + r * 1e-6))
    tokens = tokens - grant
    if tokens < 1 then wait = (1 - tokens) / r end
  end
  redis.call('HSET', bucket, 'tk', tostring(tokens), 'ts', tostring(now))
  if st[3] and f >= 1 then redis.call('HDEL', bucket, 'f', 'fc') end
  redis.call('PEXPIRE', bucket, math.ceil(math.max(burst / rate, {_HOLD_S}) * 1000) + 1000)
  if rank < {LOWEST_RANK} then
    if grant < want then
      redis.call('HSET', bucket, 'd' .. rank, tostring(now + wait + {LANE_DEMAND_MARGIN_S}))
    elseif st[5 + rank] then
      redis.call('HDEL', bucket, 'd' .. rank)
    end
  end
  return grant, wait, f
end
"""

# epoch(key, known id, id for a new epoch, now): the account's epoch, created when missing (a new or
# an emptied store); `lost` once a caller that knew an earlier epoch finds it gone or replaced.
# Returns {id, age ms, lost}.
_EPOCH_FN = """
local function epoch(key, known, fresh_id, now_s)
  local now = math.floor(now_s * 1000)
  local ep = redis.call('HMGET', key, 'id', 'since', 'lost')
  if not ep[1] then
    local lost = 0
    if known ~= '' then lost = 1 end
    redis.call('HSET', key, 'id', fresh_id, 'since', now, 'lost', lost)
    return {fresh_id, 0, lost}
  end
  local lost = tonumber(ep[3]) or 0
  if known ~= '' and known ~= ep[1] and lost == 0 then
    lost = 1
    redis.call('HSET', key, 'lost', 1)
  end
  return {ep[1], now - tonumber(ep[2]), lost}
end
"""

# KEYS = dedupe keys, [with a budget: their hold keys, then the budget's counters], then the
# account's bucket and epoch (all with the account's hash tag); ARGV = owner, lease ms, window ms,
# rate per s, burst, known epoch id, new epoch id, now, flags (_flags: replay, no token), lane rank,
# min share, then the budget (_BUDGET_FN). Claims, then takes a token for each new claim without the
# no-token flag:
# {claims, granted, wait, factor, epoch, the counters' use after the claims}.
_CLAIM_TAKE = (
    _NOW_FN
    + _CLAIM_FN
    + _BUDGET_FN
    + _FACTOR_FN
    + _TAKE_FN
    + _EPOCH_FN
    + """
local now = clock(ARGV[8])
local ep = epoch(KEYS[#KEYS], ARGV[6], ARGV[7], now)
local b, n = budget_of(#KEYS)
local out, fresh = claim(n, ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), now, ARGV[9], b)
local used = {}
if b then for c = 1, #b.used do used[c] = b.used[c] end end
if fresh == 0 then return {out, 0, '0', '1', ep, used} end
local grant, wait, f = take(
  KEYS[#KEYS - 1], tonumber(ARGV[4]), tonumber(ARGV[5]), fresh, now, tonumber(ARGV[10]), tonumber(ARGV[11]))
return {out, grant, tostring(wait), tostring(f), ep, used}
"""
)

# A batch's record (state.base.BatchRecord) in one step. (A script rather than a transaction: the
# same on a single Redis, behind Sentinel and in a Cluster, where every key of one account shares a
# slot.) KEYS = due, open, then nd result keys, nu unknown keys, nr release keys, nt correlation
# keys (one per tracked message), nn retry-note keys, when nb > 0 the hour's number index, then nf
# budget holds to refund and ns to spend.
# ARGV = nd, nu, nr, dedupe ttl ms, owner, the unknown record, track ttl ms, first poll after s,
# hold s, nt, nn, nb, now (s), then nd result JSONs, (record, message id, accepted at) per tracked
# message, nn note JSONs, nb index members (`number|at|unique_id`), and last nf and ns.
_RECORD = """
local nd, nu, nr = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local nt, nn, nb = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local ttl, owner, now = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[13])
local k = 2
for i = 1, nd do
  redis.call('SET', KEYS[k + i], cjson.encode({s = 'done', r = ARGV[13 + i]}), 'PX', ttl)
end
k = k + nd
for i = 1, nu do redis.call('SET', KEYS[k + i], ARGV[6], 'PX', ttl) end
k = k + nu
for i = 1, nr do
  local raw = redis.call('GET', KEYS[k + i])
  if raw then
    local rec = cjson.decode(raw)
    if rec.s == 'inflight' and rec.o == owner then redis.call('DEL', KEYS[k + i]) end
  end
end
k = k + nr
local track_ttl, first, hold = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local a = 13 + nd
for i = k + 1, k + nt do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local at = tonumber(ARGV[a + 3])
    if hold > 0 then
      local held_to = math.floor((at + hold) * 1000)
      redis.call('HSET', KEYS[i], 'r', ARGV[a + 1], 's', 'claim', 'o', '{HOLDER}', 'l', held_to, 'n', 0)
    else
      redis.call('HSET', KEYS[i], 'r', ARGV[a + 1], 's', 'open', 'n', 0)
    end
    redis.call('PEXPIRE', KEYS[i], track_ttl)
    redis.call('ZADD', KEYS[1], at + first, ARGV[a + 2])
    redis.call('ZADD', KEYS[2], at, ARGV[a + 2])
  end
  a = a + 3
end
k = k + nt
for i = 1, nn do redis.call('SET', KEYS[k + i], ARGV[a + i], 'PX', ttl) end
k, a = k + nn, a + nn
if nb > 0 then
  -- one sorted set an hour, every member at score 0 so that a number's members are one lex range
  for first = 1, nb, 1000 do
    local args = {}
    for i = first, math.min(nb, first + 999) do
      args[#args + 1] = 0
      args[#args + 1] = ARGV[a + i]
    end
    redis.call('ZADD', KEYS[k + 1], unpack(args))
  end
  if redis.call('PTTL', KEYS[k + 1]) < ttl + 3600000 then redis.call('PEXPIRE', KEYS[k + 1], ttl + 3600000) end
  k = k + 1
end
-- budget holds: nf refunded (their parts given back to each counter still kept), then ns spent
local nf, ns = tonumber(ARGV[#ARGV - 1]), tonumber(ARGV[#ARGV])
for i = k + 1, k + nf do
  local hold = redis.call('GET', KEYS[i])
  if hold then
    for counter, amount in string.gmatch(hold, '([^|=]+)=(%d+)') do
      if redis.call('EXISTS', counter) == 1 then redis.call('DECRBY', counter, tonumber(amount)) end
    end
    redis.call('DEL', KEYS[i])
  end
end
for i = k + nf + 1, k + nf + ns do redis.call('DEL', KEYS[i]) end
return 1
""".replace("{HOLDER}", HOLDER)

# KEYS = one correlation key per message: their holds end.
_ANNOUNCE = f"""
for i = 1, #KEYS do
  local st = redis.call('HMGET', KEYS[i], 's', 'o')
  if st[1] == 'claim' and st[2] == '{HOLDER}' then redis.call('HSET', KEYS[i], 's', 'open') end
end
return 1
"""

# KEYS = due, then one correlation key per message; ARGV = (next poll time, message id) per message.
_POLL_LATER = """
for i = 2, #KEYS do
  local j = (i - 2) * 2 + 1
  if redis.call('ZSCORE', KEYS[1], ARGV[j + 1]) then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[j]), ARGV[j + 1])
    redis.call('HINCRBY', KEYS[i], 'n', 1)
  end
end
return #KEYS - 1
"""


# KEYS[1] = bucket; ARGV = rate per s, burst, wanted, now, lane rank, min share.
# Returns {granted, wait (string), factor}.
_ACQUIRE = (
    _NOW_FN
    + _FACTOR_FN
    + _TAKE_FN
    + """
local grant, wait, f = take(
  KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), clock(ARGV[4]), tonumber(ARGV[5]),
  tonumber(ARGV[6]))
return {grant, tostring(wait), tostring(f)}
"""
)

# KEYS[1] = bucket; ARGV = now. Halves the factor unless it was cut within the cooldown, and
# empties the bucket. Returns the factor (string).
_THROTTLE = (
    _NOW_FN
    + _FACTOR_FN
    + f"""
local now = clock(ARGV[1])
local st = redis.call('HMGET', KEYS[1], 'f', 'fc')
local f = factor(st[1], st[2], now)
if st[2] and now - tonumber(st[2]) < {THROTTLE_COOLDOWN_S} then return tostring(f) end
f = math.max({THROTTLE_MIN_FACTOR}, f / 2)
redis.call('HSET', KEYS[1], 'f', tostring(f), 'fc', tostring(now), 'tk', '0', 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], {int(_HOLD_S * 1000) + 1000})
return tostring(f)
"""
)

# KEYS = pause hash; ARGV = owner, record, ms until the pause ends. The hash lives as long as its
# longest pause.
_NOTE_PAUSE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3])) end
return 1
"""

# KEYS = bucket; ARGV = now. The throttle factor now (1 when not throttled).
_FACTOR = (
    _NOW_FN
    + _FACTOR_FN
    + """
local st = redis.call('HMGET', KEYS[1], 'f', 'fc')
return tostring(factor(st[1], st[2], clock(ARGV[1])))
"""
)

# KEYS = correlation; ARGV = owner, lease ms, now. Returns {state, record}. (A message marked final by
# a rebuild may have no record.)
_BEGIN_FINAL = (
    _NOW_FN
    + """
local now = math.floor(clock(ARGV[3]) * 1000)
local st = redis.call('HMGET', KEYS[1], 'r', 's', 'o', 'l')
if st[2] == 'final' then return {'done', ''} end
if not st[1] then return {'unknown', ''} end
if st[2] == 'claim' and st[3] ~= ARGV[1] and tonumber(st[4]) > now then
  if st[3] == '{HOLDER}' then return {'held', ''} end
  return {'busy', ''}
end
redis.call('HSET', KEYS[1], 's', 'claim', 'o', ARGV[1], 'l', now + tonumber(ARGV[2]))
return {'claimed', st[1]}
""".replace("{HOLDER}", HOLDER)
)

# KEYS = the account's epoch; ARGV = known id, id for a new epoch, now. {id, age ms, lost}.
_EPOCH = _NOW_FN + _EPOCH_FN + "return epoch(KEYS[1], ARGV[1], ARGV[2], clock(ARGV[3]))"

# KEYS = due, open, then one correlation key per message; ARGV = ttl ms, then the message ids.
_MARK_FINAL = """
for i = 3, #KEYS do
  redis.call('HSET', KEYS[i], 's', 'final')
  if redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[1])) end
  redis.call('ZREM', KEYS[1], ARGV[i - 1])
  redis.call('ZREM', KEYS[2], ARGV[i - 1])
end
return #KEYS - 2
"""

# KEYS = correlation, due, open; ARGV = message id, owner, final status, its time ('' if unknown).
_END_FINAL = """
if redis.call('HGET', KEYS[1], 'o') == ARGV[2] then
  redis.call('HSET', KEYS[1], 's', 'final')
  if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'f', ARGV[3], 'fa', ARGV[4]) end
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""

# KEYS = correlation; ARGV = owner.
_ABANDON_FINAL = """
if redis.call('HGET', KEYS[1], 's') == 'claim' and redis.call('HGET', KEYS[1], 'o') == ARGV[1] then
  redis.call('HSET', KEYS[1], 's', 'open')
end
return 1
"""

# A webhook's hint (Store.hint). KEYS = event key, correlation, due, early; ARGV = message id, bind
# ttl ms, now, the parked report, park until (s), park max. Returns {bound before or '', action}.
_HINT = (
    _NOW_FN
    + """
local before = redis.call('GET', KEYS[1])
if before and before ~= ARGV[1] then return {before, 'refused'} end
if not before then redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2])) end
local b = before or ''
local st = redis.call('HGET', KEYS[2], 's')
if st then
  if st ~= 'final' then redis.call('ZADD', KEYS[3], 'LT', clock(ARGV[3]), ARGV[1]) end
  return {b, 'poll_due'}
end
if redis.call('HLEN', KEYS[4]) >= tonumber(ARGV[6]) then return {b, 'full'} end
redis.call('HSET', KEYS[4], ARGV[1], cjson.encode({tonumber(ARGV[5]), ARGV[4]}))
return {b, 'parked'}
"""
)

# KEYS = due, early, then one correlation key per parked message id; ARGV = now, then the ids. A
# tracked one's poll becomes due now (unless final) and its hint goes. Returns how many matched.
_MATCH_PARKED = (
    _NOW_FN
    + """
local now, n = clock(ARGV[1]), 0
for i = 3, #KEYS do
  local st = redis.call('HGET', KEYS[i], 's')
  if st then
    if st ~= 'final' then redis.call('ZADD', KEYS[1], 'LT', now, ARGV[i - 1]) end
    redis.call('HDEL', KEYS[2], ARGV[i - 1])
    n = n + 1
  end
end
return n
"""
)

# KEYS = due; ARGV = limit, lease s, now. Leases the due ids (their score moves to now + lease).
_DUE = (
    _NOW_FN
    + """
local now = clock(ARGV[3])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id) end
return ids
"""
)


def connect(url: str, timeout_s: float = 5.0) -> tuple[aioredis.Redis, list[aioredis.Redis]]:
    """A client for the URL's deployment:
    - `redis://` / `rediss://`: one server (TLS options in the query: `ssl_ca_certs`, ...);
    - `redis+sentinel://[:password@]host:port[,host:port...]/<service>[/<db>]`: the service's master,
      found and followed through a failover by the Sentinels (`?sentinel_password=` if they need one);
      `rediss+sentinel://` speaks TLS to the Sentinels and the master (options as for `rediss://`);
    - `redis+cluster://[:password@]host:port/`: a Redis Cluster, discovered from that node.
    Every key of one account carries the account as its hash tag, so each script runs in one slot.
    Every command and connect is bounded by `timeout_s`, with TCP keepalive on: a host that vanishes
    answers nothing, not even a reset, and without a bound a call to it waits for good (tested
    through `testkit.netcut`). A call past the bound fails, and its connection is dropped.
    Returns the client, and the Sentinels' own clients (to be closed with it)."""
    bounds: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "socket_keepalive": True,
    }
    scheme, _, rest = url.partition("://")
    if scheme.endswith("+cluster"):
        from redis.asyncio.cluster import RedisCluster

        base = scheme.removesuffix("+cluster")
        cluster = RedisCluster.from_url(f"{base}://{rest}", decode_responses=True, **bounds)
        return cast(aioredis.Redis, cluster), []
    if scheme.endswith("+sentinel"):
        from redis.asyncio.sentinel import Sentinel

        parts = urlsplit(f"redis://{rest}")
        auth, _, hosts = parts.netloc.rpartition("@")
        password = unquote(auth.partition(":")[2]) or None
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("a redis+sentinel URL names the service: redis+sentinel://host:26379/<service>")
        query: dict[str, Any] = dict(parse_qsl(parts.query))
        sentinels = [
            (h.rpartition(":")[0], int(h.rpartition(":")[2])) if ":" in h else (h, 26379) for h in hosts.split(",")
        ]
        sentinel_auth = {"password": query.pop("sentinel_password")} if "sentinel_password" in query else {}
        if scheme.startswith("rediss"):  # TLS asked for: to the Sentinels and to the master alike
            query["ssl"] = True
            sentinel_auth["ssl"] = True
        # redis-py leaves Sentinel's constructor untyped
        sentinel = Sentinel(sentinels, sentinel_kwargs={**sentinel_auth, **bounds}, **bounds)  # type: ignore[no-untyped-call]
        db = int(path[1]) if len(path) > 1 else 0
        master: aioredis.Redis = sentinel.master_for(
            path[0], password=password, db=db, decode_responses=True, **{**bounds, **query}
        )
        return master, list(sentinel.sentinels)
    client: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True, **bounds)
    return client, []


_UNKNOWN = json.dumps({"s": "unknown"})


class RedisStore(RecordShortcuts):
    def __init__(self, url: str, clock: Clock | None = None, *, timeout_s: float = 5.0) -> None:
        """Raises StoreRefused for a URL the client cannot use (scheme, values, no Sentinel service)."""
        try:
            self._redis, self._sentinels = connect(url, timeout_s)
        except ValueError as exc:  # redis-py and `connect` read the URL here, before any I/O
            raise StoreRefused(f"the URL cannot be used: {exc}") from None
        self._claim_take = self._redis.register_script(_CLAIM_TAKE)
        self._record = self._redis.register_script(_RECORD)
        self._note_pause = self._redis.register_script(_NOTE_PAUSE)
        self._factor = self._redis.register_script(_FACTOR)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._throttle = self._redis.register_script(_THROTTLE)
        self._begin_final = self._redis.register_script(_BEGIN_FINAL)
        self._end_final = self._redis.register_script(_END_FINAL)
        self._abandon_final = self._redis.register_script(_ABANDON_FINAL)
        self._announce = self._redis.register_script(_ANNOUNCE)
        self._due = self._redis.register_script(_DUE)
        self._hint = self._redis.register_script(_HINT)
        self._epoch = self._redis.register_script(_EPOCH)
        self._mark_final = self._redis.register_script(_MARK_FINAL)
        self._match_parked = self._redis.register_script(_MATCH_PARKED)
        self._poll_later = self._redis.register_script(_POLL_LATER)
        self._epochs = EpochMemory()
        self._clock = clock

    def __repr__(self) -> str:
        return "RedisStore()"  # the URL may hold a password

    def _now(self) -> str:
        return "" if self._clock is None else repr(self._clock.time())

    async def claim_and_acquire(
        self,
        account: str,
        uids: list[str],
        owner: str,
        lease_s: float,
        rate: float,
        burst: int,
        *,
        suspect: Collection[str] = (),
        recovery_s: float = 0.0,
        replay: Collection[str] = (),
        rank: int = NORMAL_RANK,
        min_share: float = 0.0,
        budget: Budget | None = None,
        untokened: Collection[str] = (),
    ) -> tuple[dict[str, Claim], Grant]:
        if not uids:
            return {}, NOTHING
        keys = [dedupe_key(account, u) for u in uids]
        spec: list[Any] = []
        if budget is not None:
            keys += [hold_key(account, u) for u in uids]
            keys += [budget_key(account, counter.name) for counter in budget.counters]
            spec = [
                len(budget.counters),
                *(counter.limit for counter in budget.counters),
                *(int(counter.expires_at * 1000) for counter in budget.counters),
                *(_ask(budget.asks.get(u)) for u in uids),
            ]
        keys += [bucket_key(account), epoch_key(account)]
        known = self._epochs.known(account)
        # The window is applied when the result is stored; a claim only needs to outlive its lease.
        rows, granted, wait, factor, (epoch_id, age_ms, lost), used = await self._claim_take(
            keys=keys,
            args=[
                owner,
                int(lease_s * 1000),
                int(max(lease_s * 4, 3600) * 1000),
                rate,
                burst,
                known,
                secrets.token_hex(8),
                self._now(),
                _flags(uids, replay, untokened),
                rank,
                min_share,
                *spec,
            ],
        )
        epoch = Epoch(str(epoch_id), int(age_ms) / 1000, bool(int(lost)))
        self._epochs.saw(account, epoch)
        grant = Grant(int(granted), float(wait), float(factor))
        if budget is not None:
            note_budget_use(account, budget.counters, [int(x) for x in used])
        return distrust_new(_claims(uids, rows, budget), epoch, suspect, recovery_s), grant

    async def budget_use(self, account: str, counters: Sequence[BudgetCounter]) -> list[int]:
        if not counters:
            return []
        values = await self._redis.mget([budget_key(account, c.name) for c in counters])
        return [int(v or 0) for v in values]

    async def record(self, account: str, batch: BatchRecord) -> None:
        if not batch:
            return
        now = self._clock.time() if self._clock is not None else time.time()
        keys = [dlr_key(account, "due"), dlr_key(account, "open")]
        keys += [dedupe_key(account, u) for u in (*batch.done, *batch.unknown, *batch.release)]
        args: list[Any] = [
            len(batch.done),
            len(batch.unknown),
            len(batch.release),
            max(1, int(batch.ttl_s * 1000)),
            batch.owner,
            _UNKNOWN,
            max(1, int(batch.track_ttl_s * 1000)),
            batch.first_poll_s,
            batch.hold_s,
            len(batch.tracked),
            len(batch.retries),
            len(batch.numbers),
            now,
            *(r.to_json() for r in batch.done.values()),
        ]
        for t in batch.tracked:
            keys.append(corr_key(account, t.provider_message_id))
            args += [t.to_json(), t.provider_message_id, t.accepted_at]
        keys += [trail_key(account, uid) for uid in batch.retries]
        args += [note.to_json() for note in batch.retries.values()]
        if batch.numbers:
            keys.append(number_key(account, int(now // 3600)))
            args += [f"{number}|{now:.3f}|{uid}" for uid, number in batch.numbers.items()]
        keys += [hold_key(account, uid) for uid in (*batch.refund, *batch.spend)]
        args += [len(batch.refund), len(batch.spend)]
        await self._record(keys=keys, args=args)

    async def acquire(
        self, key: str, want: int, rate: float, burst: int, rank: int = NORMAL_RANK, min_share: float = 0.0
    ) -> Grant:
        granted, wait, factor = await self._acquire(
            keys=[bucket_key(key)], args=[rate, burst, want, self._now(), rank, min_share]
        )
        return Grant(int(granted), float(wait), float(factor))

    async def throttle(self, key: str) -> float:
        return float(await self._throttle(keys=[bucket_key(key)], args=[self._now()]))

    async def note_pause(self, account: str, pause: Pause) -> None:
        now = self._clock.time() if self._clock is not None else time.time()
        ms = max(1, int((pause.until - now) * 1000))
        await self._note_pause(keys=[pause_key(account)], args=[pause.owner, pause.to_json(), ms])

    async def account_state(self, account: str) -> AccountState:
        now = self._clock.time() if self._clock is not None else time.time()
        raw: dict[str, str] = await cast(Awaitable[dict[str, str]], self._redis.hgetall(pause_key(account)))
        pauses = sorted((Pause.from_json(o, v) for o, v in raw.items()), key=lambda p: p.owner)
        factor = float(await self._factor(keys=[bucket_key(account)], args=[self._now()]))
        return AccountState(tuple(p for p in pauses if p.until > now), factor)

    # -- delivery reports ---------------------------------------------------------------------------

    async def epoch_changed(self, account: str, *, look: bool = True) -> bool:
        if look:
            epoch_id, age_ms, lost = await self._epoch(
                keys=[epoch_key(account)], args=[self._epochs.known(account), secrets.token_hex(8), self._now()]
            )
            self._epochs.saw(account, Epoch(str(epoch_id), int(age_ms) / 1000, bool(int(lost))))
        return self._epochs.take_changed(account)

    async def mark_final(self, account: str, message_ids: Sequence[str], ttl_s: float) -> None:
        if not message_ids:
            return
        keys = [dlr_key(account, "due"), dlr_key(account, "open"), *(corr_key(account, m) for m in message_ids)]
        await self._mark_final(keys=keys, args=[int(ttl_s * 1000), *message_ids])

    async def begin_final(
        self, account: str, message_id: str, owner: str, lease_s: float
    ) -> tuple[FinalState, Tracked | None]:
        state, record = await self._begin_final(
            keys=[corr_key(account, message_id)], args=[owner, int(lease_s * 1000), self._now()]
        )
        st = FinalState(state)
        return st, Tracked.from_json(record) if st is FinalState.CLAIMED else None

    async def end_final(self, account: str, message_id: str, owner: str, status: str = "", status_at: str = "") -> None:
        keys = [corr_key(account, message_id), dlr_key(account, "due"), dlr_key(account, "open")]
        await self._end_final(keys=keys, args=[message_id, owner, status, status_at])

    async def trail(self, account: str, unique_id: str) -> Trail:
        now = self._clock.time() if self._clock is not None else time.time()
        raw, note = await self._redis.mget(dedupe_key(account, unique_id), trail_key(account, unique_id))
        claim: Claim | None = None
        if raw is not None:
            rec = json.loads(raw)
            if rec.get("s") == "done":
                claim = Claim(ClaimState.DONE, StoredResult.from_json(rec["r"]))
            elif rec.get("s") == "inflight" and float(rec.get("l", 0)) / 1000 > now:
                claim = Claim(ClaimState.BUSY, owner=rec.get("o"), lease_left_s=float(rec["l"]) / 1000 - now)
            else:  # an unknown mark, or a claim whose lease ran out: the next copy reconciles
                claim = Claim(ClaimState.RECONCILE, owner=rec.get("o"))
        retry = RetryNote.from_json(note) if note is not None else None
        delivery = None
        mid = claim.result.provider_message_id if claim is not None and claim.result is not None else None
        if mid:
            corr: dict[str, str] = await cast(Awaitable[dict[str, str]], self._redis.hgetall(corr_key(account, mid)))
            if corr.get("r"):
                due = await self._redis.zscore(dlr_key(account, "due"), mid)
                state = corr.get("s", "open")
                if state == "claim" and corr.get("o") == HOLDER:
                    state = "held"
                polls = int(corr.get("n", 0))
                tracked = Tracked.from_json(corr["r"], polls)
                delivery = Delivery(tracked, state, polls, due, corr.get("f"), corr.get("fa"))
        return Trail(claim, retry, delivery)

    async def by_number(self, account: str, number: str, limit: int = 50, window_s: float = 86400.0) -> list[str]:
        now = self._clock.time() if self._clock is not None else time.time()
        found: list[tuple[float, str]] = []
        for hour in range(int(now // 3600), int((now - window_s) // 3600) - 1, -1):
            members = await self._redis.zrangebylex(number_key(account, hour), f"[{number}|", f"[{number}|~")
            for member in members:
                _, at, uid = member.split("|", 2)
                if float(at) >= now - window_s:
                    found.append((float(at), uid))
            if len(found) >= limit:
                break
        return [uid for _, uid in sorted(found, reverse=True)[:limit]]

    async def abandon_final(self, account: str, message_id: str, owner: str) -> None:
        await self._abandon_final(keys=[corr_key(account, message_id)], args=[owner])

    async def announce(self, account: str, message_ids: Sequence[str]) -> None:
        if message_ids:
            await self._announce(keys=[corr_key(account, mid) for mid in message_ids])

    async def due_polls(self, account: str, limit: int, lease_s: float) -> list[Tracked]:
        ids = await self._due(keys=[dlr_key(account, "due")], args=[limit, lease_s, self._now()])
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for message_id in ids:
                pipe.hmget(corr_key(account, message_id), ["r", "s", "n"])
            rows = await pipe.execute()
        out: list[Tracked] = []
        gone: list[str] = []
        for message_id, (record, state, polls) in zip(ids, rows, strict=True):
            if record is None or state == "final":
                gone.append(message_id)  # expired or published: nothing to poll
            else:
                out.append(Tracked.from_json(record, int(polls or 0)))
        if gone:
            await self._redis.zrem(dlr_key(account, "due"), *gone)
            await self._redis.zrem(dlr_key(account, "open"), *gone)
        return out

    async def due_accounts(self, accounts: Sequence[str]) -> set[str]:
        # One pipeline: each account's keys are in its own slot, and a cluster client splits the
        # pipeline by node. This process's clock stands in for the server's (the scripts' `clock`):
        # a skew of a few milliseconds finds a poll one look later. A published message still in
        # `due` costs one empty poll, which removes it.
        now = self._clock.time() if self._clock is not None else time.time()
        async with self._redis.pipeline(transaction=False) as pipe:
            for account in accounts:
                pipe.zrangebyscore(dlr_key(account, "due"), "-inf", now, start=0, num=1)
            found = await pipe.execute()
        return {account for account, ids in zip(accounts, found, strict=True) if ids}

    async def poll_later(self, account: str, next_at: Mapping[str, float]) -> None:
        if not next_at:
            return
        keys = [dlr_key(account, "due"), *(corr_key(account, m) for m in next_at)]
        args: list[Any] = []
        for message_id, at in next_at.items():
            args += [at, message_id]
        await self._poll_later(keys=keys, args=args)

    async def hint(self, account: str, event_id: str, message_id: str, hint: WebhookHint) -> tuple[str | None, str]:
        now = self._clock.time() if self._clock else time.time()
        keys = [
            dlr_key(account, f"ev:{event_id}"),
            corr_key(account, message_id),
            dlr_key(account, "due"),
            dlr_key(account, "early"),
        ]
        args: list[Any] = [
            message_id,
            int(hint.bind_ttl_s * 1000),
            self._now(),
            hint.report,
            now + hint.park_ttl_s,
            hint.park_max,
        ]
        before, action = await self._hint(keys=keys, args=args)
        return (str(before) or None), str(action)

    async def match_parked(self, account: str, limit: int) -> int:
        now = self._clock.time() if self._clock else time.time()
        early = dlr_key(account, "early")
        ids: list[str] = []
        stale: list[str] = []
        async for message_id, raw in self._redis.hscan_iter(early, count=limit):
            (stale if json.loads(raw)[0] < now else ids).append(message_id)
            if len(ids) >= limit:
                break
        if stale:
            await self._redis.hdel(early, *stale)  # type: ignore[misc]  # redis-py types sync and async alike
        if not ids:
            return 0
        keys = [dlr_key(account, "due"), early, *(corr_key(account, m) for m in ids)]
        return int(await self._match_parked(keys=keys, args=[self._now(), *ids]))

    async def oldest_open(self, account: str) -> float | None:
        rows = await self._redis.zrange(dlr_key(account, "open"), 0, 0, withscores=True)
        return float(rows[0][1]) if rows else None

    # -- the opt-out registry ----------------------------------------------------------------------

    async def opted_out(self, account: str, numbers: Collection[str]) -> set[str]:
        wanted = list(dict.fromkeys(numbers))
        if not wanted:
            return set()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(optout_key(account), wanted)
            pipe.hmget(optout_key(OPTOUT_ALL), wanted)
            mine, everyone = await pipe.execute()
        return {n for n, a, b in zip(wanted, mine, everyone, strict=True) if a is not None or b is not None}

    async def optout_add(self, scope: str, entries: Sequence[OptOut]) -> int:
        key, added = optout_key(scope), 0
        for i in range(0, len(entries), _OPTOUT_CHUNK * 10):
            async with self._redis.pipeline(transaction=False) as pipe:
                for j in range(i, min(i + _OPTOUT_CHUNK * 10, len(entries)), _OPTOUT_CHUNK):
                    chunk = entries[j : j + _OPTOUT_CHUNK]
                    pipe.hset(key, mapping={e.number: e.to_json() for e in chunk})
                added += sum(int(n) for n in await pipe.execute())
        return added

    async def optout_remove(self, scope: str, numbers: Sequence[str]) -> int:
        key, removed = optout_key(scope), 0
        for i in range(0, len(numbers), _OPTOUT_CHUNK):
            removed += int(await cast(Awaitable[int], self._redis.hdel(key, *numbers[i : i + _OPTOUT_CHUNK])))
        return removed

    async def optout_page(self, scope: str, cursor: str = "", limit: int = 1000) -> tuple[list[OptOut], str | None]:
        nxt, found = await self._redis.hscan(optout_key(scope), int(cursor or 0), count=limit)
        page = [OptOut.from_json(str(n), str(v)) for n, v in found.items()]
        return page, (None if int(nxt) == 0 else str(nxt))

    async def optout_count(self, scope: str) -> int:
        return int(await cast(Awaitable[int], self._redis.hlen(optout_key(scope))))

    async def ping(self) -> None:
        """Raises StoreRefused (login, permission, TLS, an unknown URL option) or StoreUnavailable."""
        try:
            await self._redis.ping()
        except (
            redis.exceptions.AuthenticationError,
            redis.exceptions.AuthorizationError,
            redis.exceptions.NoPermissionError,
        ) as exc:
            raise StoreRefused(f"the store refused the login: {exc}") from None
        except TypeError as exc:  # redis-py passes the URL's options to each new connection's constructor
            raise StoreRefused(f"an option of the URL is unknown to the client: {exc}") from None
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            if (tls := tls_failure(exc)) is not None:
                raise StoreRefused(f"TLS: {tls}") from None
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self._redis.aclose()
        for sentinel in self._sentinels:
            await sentinel.aclose()


def _claims(uids: list[str], rows: list[Any], budget: Budget | None = None) -> dict[str, Claim]:
    out: dict[str, Claim] = {}
    for uid, row in zip(uids, rows, strict=True):
        st = ClaimState(row[0])
        if st is ClaimState.BUSY:
            out[uid] = Claim(st, owner=row[1] or None, lease_left_s=int(row[2]) / 1000)
        elif st is ClaimState.QUOTA:
            assert budget is not None
            out[uid] = Claim(st, budget=budget.counters[int(row[1]) - 1])
        else:
            out[uid] = Claim(st, StoredResult.from_json(row[1]) if st is ClaimState.DONE else None)
    return out
