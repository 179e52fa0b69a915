-- wrk script for bench_api.py. Arguments (after `--`):
--   read   IDS_FILE   PATH_PREFIX TOKEN
--   upsert SEEDS_FILE PATH        TOKEN TAG REPEAT_RATIO
-- TOKEN may be "-" (no Authorization header). TAG makes the new keys of one measurement unique.
-- done() prints one line `BENCH_JSON {...}` with the counters and the full latency histogram (µs).

local threads = {}
local next_tid = 0

function setup(thread)
  next_tid = next_tid + 1
  thread:set("tid", next_tid)
  table.insert(threads, thread)
end

local mode, target, tag, repeat_ratio
local keys = {}
local n = 0
statuses = {}

function init(args)
  mode, target = args[1], args[3]
  for line in io.lines(args[2]) do
    if #line > 0 then
      keys[#keys + 1] = line
    end
  end
  if args[4] and args[4] ~= "-" then
    wrk.headers["Authorization"] = "Bearer " .. args[4]
  end
  if mode == "upsert" then
    tag = args[5]
    repeat_ratio = tonumber(args[6])
    wrk.headers["Content-Type"] = "application/json"
  end
  math.randomseed(os.time() * 1000 + tid)
end

function request()
  if mode == "read" then
    return wrk.format("GET", target .. keys[math.random(#keys)])
  end
  n = n + 1
  local ext, email, first
  if math.random() < repeat_ratio then
    -- SEEDS_FILE lines are "external_id email" of seeded contacts.
    local line = keys[math.random(#keys)]
    ext, email = line:match("^(%S+) (%S+)$")
    first = "Again" .. tid .. "x" .. n
  else
    ext = tag .. "-" .. tid .. "-" .. n
    email = ext .. "@new.bench-mail.com"
    first = "New"
  end
  local body = '{"external_id":"' .. ext .. '","email":"' .. email .. '","first_name":"' .. first ..
               '","last_name":"Bench","phone":"06 12 34 56 78"}'
  return wrk.format("POST", target, nil, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local merged = {}
  for _, thread in ipairs(threads) do
    local s = thread:get("statuses")
    for code, count in pairs(s) do
      merged[code] = (merged[code] or 0) + count
    end
  end
  local status_parts = {}
  for code, count in pairs(merged) do
    status_parts[#status_parts + 1] = string.format('"%d":%d', code, count)
  end
  local hist = {}
  for i = 1, #latency do
    local value, count = latency(i)
    hist[#hist + 1] = string.format("[%d,%d]", value, count)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"statuses":{%s},"hist":[%s]}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(status_parts, ","), table.concat(hist, ",")))
end
