-- Signed GitHub deliveries, each with its own X-GitHub-Delivery.
-- Environment: BENCH_BODY (payload file), BENCH_SIG (its signature),
-- BENCH_PATH (route), BENCH_RUN (a prefix that makes ids unique per run).
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
  body = f:read("*a")
  f:close()
  sig = os.getenv("BENCH_SIG")
  path = os.getenv("BENCH_PATH") or "/webhooks/github"
  run = os.getenv("BENCH_RUN") or "run"
  counter = 0
end

function request()
  counter = counter + 1
  return wrk.format("POST", path, {
    ["Content-Type"] = "application/json",
    ["X-GitHub-Event"] = "issues",
    ["X-GitHub-Delivery"] = run .. "-" .. tid .. "-" .. counter,
    ["X-Hub-Signature-256"] = sig,
  }, body)
end

function done(summary, latency, requests)
  io.write(string.format("RESULT %.1f %d %d %d %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99),
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.requests))
end
