-- The requests runtimeai-bench has wrk send through the load balancer. wrk passes what follows
-- `--` on its command line to init(): the kind of request, then its arguments.
--   create <token> <tag>        POST /v1/runtimes, a new name each time (RuntimeAI)
--   get    <token> <id>         GET /v1/runtimes/<id>, linearizable (RuntimeAI)
--   put    <value> <tag>        POST /v3/kv/put, a new key each time, <value> base64 (etcd)
--   range  <key>                POST /v3/kv/range of <key>, linearizable (etcd)
-- done() prints one line of JSON: the counts and the latency percentiles, in microseconds.

local bit = require("bit")
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

-- Standard base64 with padding, as etcd's JSON gateway takes keys and values.
local function base64(text)
  local out = {}
  for i = 1, #text, 3 do
    local a, b, c = text:byte(i, i + 2)
    local present = math.min(3, #text - i + 1)
    local n = bit.bor(bit.lshift(a, 16), bit.lshift(b or 0, 8), c or 0)
    for j = 0, 3 do
      if j > present then
        out[#out + 1] = "="
      else
        local index = bit.band(bit.rshift(n, 18 - 6 * j), 63) + 1
        out[#out + 1] = alphabet:sub(index, index)
      end
    end
  end
  return table.concat(out)
end

local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("thread_id", threads)
end

local kind, first, second
local sent = 0

function init(args)
  kind, first, second = args[1], args[2], args[3]
end

function request()
  sent = sent + 1
  if kind == "create" then
    local name = string.format("lb-%s-%d-%d", second, thread_id, sent)
    local body = '{"name":"' .. name .. '","type":"vcluster","labels":{"bench":"true","team":"platform"}}'
    local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. first }
    return wrk.format("POST", "/v1/runtimes", headers, body)
  elseif kind == "get" then
    return wrk.format("GET", "/v1/runtimes/" .. second, { ["Authorization"] = "Bearer " .. first })
  elseif kind == "put" then
    local key = base64(string.format("bench/%s/%d/%d", second, thread_id, sent))
    local body = '{"key":"' .. key .. '","value":"' .. first .. '"}'
    return wrk.format("POST", "/v3/kv/put", { ["Content-Type"] = "application/json" }, body)
  elseif kind == "range" then
    local body = '{"key":"' .. first .. '"}'
    return wrk.format("POST", "/v3/kv/range", { ["Content-Type"] = "application/json" }, body)
  end
  error("unknown request kind: " .. tostring(kind))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"status_errors":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"timeouts":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
