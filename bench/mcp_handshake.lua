-- wrk script: MCP session set-up, as every client starts: `initialize`, then `notifications/initialized` carrying
-- the Mcp-Session-Id the answer gave, then DELETE to close the session. Responses hand their session ids to queues
-- that the next requests take, so that with several connections each initialize is followed by one initialized and
-- one DELETE, whichever connection sends them.
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

local ended = {}

function request()
  local session = table.remove(ended)
  if session then
    return wrk.format("DELETE", nil, headers(session))
  end
  session = table.remove(sessions)
  if session then
    return wrk.format("POST", nil, headers(session), initialized)
  end
  return wrk.format("POST", nil, headers(nil), initialize)
end

function response(status, response_headers, body)
  local session = response_headers["mcp-session-id"] or response_headers["Mcp-Session-Id"]
  if not session then
    return
  end
  -- Every answer in a session carries its id: an initialize's (its result names the protocol version) opens it, the
  -- 202 to notifications/initialized ends the set-up, and the session is then closed (DELETE), as a client that is
  -- done does; the server would otherwise refuse new sessions once it holds its maximum.
  if status == 200 and body and body:find("protocolVersion", 1, true) then
    table.insert(sessions, session)
  elseif status == 202 then
    table.insert(ended, session)
  end
end

-- The summary line every wrk script prints (bench/wrk_summary.lua, beside this file).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "wrk_summary.lua")
