-- wrk -s wrk_report.lua: while wrk runs, "answered 50" every 50 responses (per thread) and "pid N"
-- the first time a thread sees a body that is a pid; when it ends, one line of JSON with its summary.
-- examples/servers/run.py reads all three.

local n, seen = 0, {}
io.stdout:setvbuf("line")

function response(status, headers, body)
   n = n + 1
   if n == 50 then
      io.write("answered 50\n")
      n = 0
   end
   local pid = body and body:match("^(%d+)\n?$")
   if pid and not seen[pid] then
      seen[pid] = true
      io.write("pid " .. pid .. "\n")
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format('{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
      .. '"timeout": %d, "non2xx": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
      latency:percentile(50), latency:percentile(99), latency.max))
end
