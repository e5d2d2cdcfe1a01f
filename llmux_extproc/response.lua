-- Runs inside Envoy on responses the LLMux processor handed back to Envoy (marked in the
-- `llmux` dynamic metadata), so that OpenAI-format answers need no Python after their
-- headers. The processor still decides everything: which responses, which prices.
--
-- strip_usage (streams): drop the usage chunk LLMux asked the provider for when the client
--   did not ask for it. At most one incomplete event is held back between chunks; a client
--   discards an unterminated event at the end anyway (SSE spec).
-- body_usage (whole bodies): read usage, add the cost headers, and leave usage in metadata
--   for the access log entry that accounts the request.

local function complete_events(data)
  local kept, i = {}, 1
  while true do
    local s, e = string.find(data, "\n\n", i, true)
    if not s then break end
    local ev = string.sub(data, i, e)
    if not (string.find(ev, '"usage"%s*:%s*{') and string.find(ev, '"choices"%s*:%s*%[%s*%]')) then
      kept[#kept + 1] = ev
    end
    i = e + 1
  end
  return table.concat(kept), string.sub(data, i)
end

local function strip_usage(handle)
  local pending = ""
  for chunk in handle:bodyChunks() do
    local data = string.gsub(pending .. chunk:getBytes(0, chunk:length()), "\r\n", "\n")
    local out
    out, pending = complete_events(data)
    chunk:setBytes(out)
  end
end

local function count(text, key)
  return tonumber(string.match(text, '"' .. key .. '"%s*:%s*(%d+)')) or 0
end

-- The same arithmetic as llmux_extproc.pricing.cost, for the token kinds OpenAI reports.
local function cost(marks, usage)
  local input = marks["price_input"]
  local output = marks["price_output"]
  if input == nil or output == nil then return nil end
  local cached_price = marks["price_cached"] or input
  local reasoning_price = marks["price_reasoning"]
  local total = (usage.prompt - usage.cached) * input + usage.cached * cached_price
  if reasoning_price ~= nil then
    total = total + usage.reasoning * reasoning_price + (usage.completion - usage.reasoning) * output
  else
    total = total + usage.completion * output
  end
  return total
end

local function body_usage(handle, marks)
  local body = handle:body()
  local text = body:getBytes(0, body:length())
  if not string.find(text, "^%s*{") then
    -- A 2xx that is not JSON cannot be what an OpenAI client expects.
    body:setBytes('{"error":{"message":"the provider returned a response that is not JSON",'
      .. '"type":"upstream_error","param":null,"code":"502"}}')
    handle:headers():replace(":status", "502")
    handle:headers():replace("content-type", "application/json")
    handle:streamInfo():dynamicMetadata():set("llmux.usage", "invalid", true)
    return
  end
  local usage = {
    prompt = count(text, "prompt_tokens"),
    completion = count(text, "completion_tokens"),
    cached = count(text, "cached_tokens"),
    reasoning = count(text, "reasoning_tokens"),
  }
  handle:streamInfo():dynamicMetadata():set("llmux.usage", "usage", {
    prompt_tokens = usage.prompt,
    completion_tokens = usage.completion,
    prompt_tokens_details = {cached_tokens = usage.cached},
    completion_tokens_details = {reasoning_tokens = usage.reasoning},
  })
  local total = cost(marks, usage)
  if total ~= nil then
    handle:streamInfo():dynamicMetadata():set("llmux.usage", "cost", total)
    local value = string.format("%.17g", total)
    handle:headers():replace("x-llmux-response-cost", value)
    handle:headers():replace("x-litellm-response-cost", value)
  end
end

function envoy_on_response(handle)
  local marks = handle:streamInfo():dynamicMetadata():get("llmux")
  if marks == nil then return end
  if marks["strip_usage"] then
    strip_usage(handle)
  elseif marks["body_usage"] then
    body_usage(handle, marks)
  end
end
