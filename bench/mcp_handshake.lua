-- wrk script: MCP session set-up, as every client starts: `initialize`, then `notifications/initialized` carrying
-- the Mcp-Session-Id the answer gave. Responses hand their session ids to a queue that the next requests take, so
-- that with several connections each initialize is followed by one initialized, whichever connection sends it.
local token = os.getenv("BENCH_TOKEN") or ""
local initialize = '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25",' ..
  '"capabilities":{},"clientInfo":{"name":"bench","version":"1"}}}'
local initialized = '{"jsonrpc":"2.0","method":"notifications/initialized"}'
local sessions = {}

local function headers(session)
  local found = {
    ["Content-Type"] = "application/json",
    ["Accept"] = "application/json, text/event-stream",
  }
  if token ~= "" then
    found["Authorization"] = "Bearer " .. token
  end
  if session then
    found["Mcp-Session-Id"] = session
    found["MCP-Protocol-Version"] = "2025-11-25"
  end
  return found
end

function request()
  local session = table.remove(sessions)
  if session then
    return wrk.format("POST", nil, headers(session), initialized)
  end
  return wrk.format("POST", nil, headers(nil), initialize)
end

function response(status, response_headers, body)
  local session = response_headers["mcp-session-id"] or response_headers["Mcp-Session-Id"]
  -- Only an initialize's answer (200) opens a session; the 202 to notifications/initialized carries the same id.
  if session and status == 200 then
    table.insert(sessions, session)
  end
end

-- The summary line every wrk script prints (bench/wrk_summary.lua, beside this file).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "wrk_summary.lua")
