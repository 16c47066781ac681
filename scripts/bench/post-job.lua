-- wrk script: POST a copy request. The body comes from the environment variable
-- BENCH_POST_BODY ({"image_id": ..., "tenant_id_dst": ...}); the token from -H.
dofile((string.gsub(debug.getinfo(1, "S").source, "^@(.*)post%-job%.lua$", "%1report.lua")))

wrk.method = "POST"
wrk.body = assert(os.getenv("BENCH_POST_BODY"), "BENCH_POST_BODY is not set")
wrk.headers["Content-Type"] = "application/json"
