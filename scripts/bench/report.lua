-- wrk script for the static requests of scripts/bench.sh (headers come from -H): it only
-- prints wrk's summary as one JSON line, so the benchmark reads exact numbers.
-- Latencies are microseconds; "non2xx" counts responses that were not 2xx/3xx.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"connect_errors":%.0f,' ..
    '"read_errors":%.0f,"write_errors":%.0f,"timeouts":%.0f,"non2xx":%.0f,' ..
    '"lat_p50_us":%.1f,"lat_p90_us":%.1f,"lat_p99_us":%.1f,"lat_mean_us":%.1f,"lat_max_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.timeout,
    e.status, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
