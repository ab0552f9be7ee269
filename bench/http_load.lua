-- wrk script of bench/http_load.py: one scenario, each request to the next of the paths given.
--
--   wrk -t T -c C -d D -s bench/http_load.lua http://host:port -- METHOD BODY_FILE API_KEY T PATH...
--
-- BODY_FILE and API_KEY are "-" for none. Appends cycle over their conversations so that no two
-- requests in flight queue on one conversation's row lock (each thread starts its cycle at its
-- own share of the list). done() prints the one line bench/http_load.py reads, times in
-- microseconds:
--   wrk-result <requests> <duration> <p50> <p99> <non-2xx/3xx answers> <socket errors>

local threads_started = 0

function setup(thread)
   thread:set("thread_index", threads_started)
   threads_started = threads_started + 1
end

function init(args)
   method = args[1]
   body = nil
   if args[2] ~= "-" then
      local file = assert(io.open(args[2], "rb"))
      body = file:read("*a")
      file:close()
   end
   headers = { ["Content-Type"] = "application/json" }
   if args[3] ~= "-" then
      headers["Authorization"] = "Bearer " .. args[3]
   end
   local threads = tonumber(args[4])
   paths = {}
   for i = 5, #args do
      paths[#paths + 1] = args[i]
   end
   position = math.floor(thread_index * #paths / threads)
end

function request()
   position = position % #paths + 1
   return wrk.format(method, paths[position], headers, body)
end

function done(summary, latency, requests)
   local errors = summary.errors
   io.write(string.format(
      "wrk-result %d %d %d %d %d %d\n",
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      errors.status, errors.connect + errors.read + errors.write + errors.timeout
   ))
end
