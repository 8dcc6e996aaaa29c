-- wrk script: authenticated MCP JSON-RPC POSTs, and one machine-readable summary line. The body is BENCH_BODY (by
-- default a tools/list request); the token comes from BENCH_TOKEN (empty for targets that check none: direct, nginx,
-- floor still receive it).
local token = os.getenv("BENCH_TOKEN") or ""
local body = os.getenv("BENCH_BODY") or ""

wrk.method = "POST"
if body == "" then
  body = '{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}'
end
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
wrk.headers["MCP-Protocol-Version"] = "2025-11-25"
if token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end

-- The summary line every wrk script prints (bench/wrk_summary.lua, beside this file).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "wrk_summary.lua")
