-- A key's model aliases (LiteLLM's `aliases` on a virtual key). Enabled only on the route of
-- API requests whose model no group serves (envoy_routing), so requests for known models
-- never run it. It asks the processor (through llmux_local, one request) what the client's
-- key maps the model to; on an answer it sets the model the routes match on and clears the
-- route cache, and the request goes to the target's group with its body as sent (Envoy 1.40
-- re-routes after clearRouteCache, verified in a spike). No answer: the request goes on to
-- llmux_local, which refuses the unknown model as before.
local REQUEST_NS = "llmux.request"
local KEY_HEADERS = {"authorization", "api-key", "x-api-key"}

local function escape(s)
  return (string.gsub(s, "[^%w%-%._~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

function envoy_on_request(handle)
  local md = handle:streamInfo():dynamicMetadata():get(REQUEST_NS)
  if md == nil or type(md["model"]) ~= "string" then return end
  local headers = {
    [":method"] = "GET",
    [":path"] = "/llmux/alias?model=" .. escape(md["model"]),
    [":authority"] = "llmux",
  }
  local any = false
  for _, name in ipairs(KEY_HEADERS) do
    if type(md[name]) == "string" then
      headers[name] = md[name]
      any = true
    end
  end
  if not any then return end
  local reply, _ = handle:httpCall("llmux_local", headers, "", 3000)
  local target = reply and reply["x-llmux-alias"]
  if reply == nil or reply[":status"] ~= "200" or target == nil or target == "" then return end
  handle:streamInfo():dynamicMetadata():set(REQUEST_NS, "model", target)
  handle:clearRouteCache()
end
