-- wrk script for the load run: POST the ~1 KiB JSON document, each request to a new record
-- path so the demo store does O(1) work per request (it keeps one collection per path).
--
-- wrk ... -s post.lua http://127.0.0.1:PORT/ -- PATH_PREFIX BODY_FILE TAG
--   PATH_PREFIX  e.g. /tenants/acme/users/ (the record id is appended)
--   BODY_FILE    the JSON document to send
--   TAG          distinguishes runs (warm-up, measurement) so paths never repeat

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  prefix = args[1] or "/tenants/acme/users/"
  local f = assert(io.open(args[2] or "doc.json", "rb"))
  body = f:read("*a"):gsub("%s+$", "")
  f:close()
  tag = args[3] or "r"
  counter = 0
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  return wrk.format("POST", prefix .. tag .. "-" .. tostring(tid) .. "-" .. counter, nil, body)
end
