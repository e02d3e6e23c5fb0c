-- wrk script: POST numbered heartbeats, and write down what came back.
--
-- Every request carries its own msg_id, "<BENCH_RUN>-<thread>-<n>", and as `ts` the wall-clock
-- time at which wrk builds it, just before sending it (wrk starts its latency clock there too),
-- so PostgreSQL's commit time minus `device_ts` is the client's send-to-commit latency. The id
-- in each 202's body is derived from the device and the msg_id: the list of them is what was
-- acknowledged, checked one by one against the stored rows.
--
-- With BENCH_RATE (requests per second, all threads together) each thread hands out send times
-- on a fixed schedule, and a connection whose answer came back waits for the next free one
-- (an open schedule, as a fleet keeps its own clock: a slow answer does not push the next
-- slots back). Without it, every connection sends again as soon as it is answered.
--
-- Environment: BENCH_TOKEN (the device's bearer token), BENCH_RUN (the msg_id prefix),
-- BENCH_OUT (the file written at the end), BENCH_THREADS (wrk's -t), BENCH_RATE (optional).
-- BENCH_OUT gets lines "sent <n>", "status <code> <n>", "bucket <tenth of a second> <202s>",
-- "latency <percentile> <microseconds>", "errors <n>" and "ack <id>".

local ffi = require("ffi")
ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock, bench_timespec *now);
]])
local CLOCK_REALTIME = 0
local clock = ffi.new("bench_timespec")

local function now()
  ffi.C.clock_gettime(CLOCK_REALTIME, clock)
  return tonumber(clock.tv_sec) + tonumber(clock.tv_nsec) * 1e-9
end

local run = os.getenv("BENCH_RUN")
local out = os.getenv("BENCH_OUT")
local rate = tonumber(os.getenv("BENCH_RATE") or "0")
local thread_count = tonumber(os.getenv("BENCH_THREADS") or "1")

local token = os.getenv("BENCH_TOKEN")

local threads = {}

function setup(thread)
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
end

function init(args)
  sent = 0
  statuses = {}
  buckets = {}
  acked = {}
  interval = rate > 0 and thread_count / rate or 0
  next_at = now()
  -- Everything but the length and the body, made once (wrk.format would make it per request).
  head = string.format(
    "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
      .. "Authorization: Bearer %s\r\nContent-Length: ",
    wrk.path, wrk.host, token
  )
end

function request()
  sent = sent + 1
  local body = string.format(
    '{"msg_id":"%s-%d-%d","ts":%.6f,"cpu":12.5,"mem":61.0,"temp_c":48.2}',
    run, thread_id, sent, now()
  )
  return head .. #body .. "\r\n\r\n" .. body
end

if rate > 0 then
  function delay()
    next_at = next_at + interval
    local wait = next_at - now()
    if wait <= 0 then
      return 0
    end
    return math.floor(wait * 1000)
  end
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 202 then
    local tenth = math.floor(now() * 10)
    buckets[tenth] = (buckets[tenth] or 0) + 1
    acked[#acked + 1] = body:match('"id"%s*:%s*"([^"]+)"') or "?"
  end
end

function done(summary, latency, requests)
  local file = assert(io.open(out, "w"))
  for _, thread in ipairs(threads) do
    file:write("sent ", thread:get("sent"), "\n")
    for code, n in pairs(thread:get("statuses")) do
      file:write("status ", code, " ", n, "\n")
    end
    for tenth, n in pairs(thread:get("buckets")) do
      file:write(string.format("bucket %d %d\n", tenth, n))
    end
    for _, id in ipairs(thread:get("acked")) do
      file:write("ack ", id, "\n")
    end
  end
  for _, p in ipairs({ 50, 90, 95, 99 }) do
    file:write("latency ", p, " ", latency:percentile(p), "\n")
  end
  local e = summary.errors
  file:write("errors ", e.connect + e.read + e.write + e.timeout, "\n")
  file:close()
end
