-- wrk script: every request carries a fresh random 32-hex-digit X-Auth-Token (a garbage
-- token of the same shape as real ones). Used against /jobs (all 401) and, as the baseline,
-- against /healthz, so both sides pay the same client-side cost per request.
dofile((string.gsub(debug.getinfo(1, "S").source, "^@(.*)random%-token%.lua$", "%1report.lua")))

local hex = "0123456789abcdef"
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("thread_no", counter)
end

function init(args)
  math.randomseed(os.time() * 1000 + (thread_no or 0) * 7919)
end

request = function()
  local t = {}
  for i = 1, 8 do
    t[i] = string.format("%04x", math.random(0, 65535))
  end
  return wrk.format("GET", nil, { ["X-Auth-Token"] = table.concat(t) })
end
