-- Runs inside Envoy on responses the LLMux processor handed back to Envoy (marked by its
-- `x-llmux-marks` header), so that OpenAI-format answers need no Python after their
-- headers. The processor still decides everything: which responses, which prices.
--
-- stream: every passed-through stream. Until the provider's usage arrives, the text the model
--   produced (content, reasoning, tool names and arguments, still JSON-escaped) is left in
--   the `llmux.stream` metadata, one key per chunk, so that a stream cut short (client gone,
--   upstream died) can still be counted with tiktoken from its access log entry. Envoy has
--   no hook at the end of a reset stream, hence a key per chunk rather than one at the end.
--   With strip_usage, the usage chunk LLMux asked the provider for is dropped when the
--   client did not ask for it; chunks with neither choices nor usage are always dropped. At
--   most one incomplete event is held back between chunks (a client discards an
--   unterminated event at the end anyway, per the SSE spec).
-- body_usage (whole bodies): read usage, add the cost headers, and leave usage in metadata
--   for the access log entry that accounts the request.

local STREAM_NS = "llmux.stream"
-- Plain searches for the keys, then an anchored pattern for the colon: several times cheaper
-- per chunk than unanchored patterns over the whole event.
local TEXT_KEYS = {'"content"', '"reasoning_content"', '"reasoning"', '"refusal"', '"name"', '"arguments"'}

-- The end of `key` followed by a colon and `value` (the start of a value, as a pattern), or nil.
local function key_then(s, key, value, i)
  while true do
    local _, e = string.find(s, key, i, true)
    if not e then return nil end
    local _, v = string.find(s, "^%s*:%s*" .. value, e + 1)
    if v then return v end
    i = e + 1
  end
end

-- The index of the quote closing a JSON string whose contents start at i.
local function string_end(s, i)
  while true do
    local q = string.find(s, '"', i, true)
    if not q then return nil end
    local b = q - 1
    while string.byte(s, b) == 92 do b = b - 1 end -- backslashes before the quote
    if (q - 1 - b) % 2 == 0 then return q end
    i = q + 1
  end
end

-- protobuf rejects strings that are not UTF-8, and one bad string would lose the whole
-- access log batch it travels in: text from a broken upstream is checked before it is kept.
local function utf8_ok(s)
  if not string.find(s, "[\128-\255]") then return true end
  local i, n = 1, #s
  while i <= n do
    local c = string.byte(s, i)
    local len, lo, hi = 1, 0x80, 0xBF
    if c >= 0xC2 and c <= 0xDF then len = 2
    elseif c >= 0xE0 and c <= 0xEF then
      len = 3
      if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
    elseif c >= 0xF0 and c <= 0xF4 then
      len = 4
      if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
    elseif c >= 0x80 then return false end
    for j = i + 1, i + len - 1 do
      local d = string.byte(s, j)
      if d == nil or d < lo or d > hi then return false end
      lo, hi = 0x80, 0xBF
    end
    i = i + len
  end
  return true
end

local function produced_text(ev, out)
  for _, key in ipairs(TEXT_KEYS) do
    local i = 1
    while true do
      local open = key_then(ev, key, '"', i)
      if not open then break end
      local close = string_end(ev, open + 1)
      if not close then break end
      local text = string.sub(ev, open + 1, close - 1)
      if utf8_ok(text) then out[#out + 1] = text end
      i = close + 1
    end
  end
end

-- The events of `complete` that may reach the client: not the usage chunk the client did not
-- ask for, nor chunks without choices or usage (Azure's prompt_filter_results), which OpenAI
-- clients index into and crash on.
local function kept_events(complete, strip)
  local kept, i, dropped = {}, 1, false
  while true do
    local s, e = string.find(complete, "\n\n", i, true)
    if not s then break end
    local ev = string.sub(complete, i, e)
    local usage = key_then(ev, '"usage"', "{", 1)
    if (usage and not strip) or not key_then(ev, '"choices"', "%[%s*%]", 1) then
      kept[#kept + 1] = ev
    else
      dropped = true
    end
    i = e + 1
  end
  return table.concat(kept), dropped
end

-- trace (only when tracing is on): what the request's span reports of an OpenAI-format answer,
-- as `llmux` metadata Envoy's tracer reads as tags (control/envoy_tracing.py).
local function trace_answer(md, text, first)
  if first then
    local model = string.match(text, '"model"%s*:%s*"([^"\\]*)"')
    if model then md:set("llmux", "response_model", model) end
    local id = string.match(text, '"id"%s*:%s*"([^"\\]*)"')
    if id then md:set("llmux", "response_id", id) end
  end
  local reasons = {}
  for reason in string.gmatch(text, '"finish_reason"%s*:%s*"([%w_]+)"') do
    reasons[#reasons + 1] = '"' .. reason .. '"'
  end
  if #reasons > 0 then md:set("llmux", "finish_reasons", "[" .. table.concat(reasons, ",") .. "]") end
end

local function count(text, key)
  return tonumber(string.match(text, '"' .. key .. '"%s*:%s*(%d+)')) or 0
end

local function trace_usage(md, text)
  md:set("llmux", "prompt_tokens", count(text, "prompt_tokens"))
  md:set("llmux", "completion_tokens", count(text, "completion_tokens"))
end

local function stream(handle, strip, trace)
  local pending, n, counted, first = "", 0, false, true
  for chunk in handle:bodyChunks() do
    local data = pending .. chunk:getBytes(0, chunk:length())
    local rewrite = pending ~= "" -- held-back bytes go out with this chunk
    if string.find(data, "\r", 1, true) then
      data = string.gsub(data, "\r\n", "\n")
      rewrite = true
    end
    -- Whole-chunk searches, not per event: a chunk often carries many events.
    local last = string.match(data, ".*()\n\n")
    local complete = last and string.sub(data, 1, last + 1) or ""
    pending = string.sub(data, #complete + 1)
    if not counted then
      local usage = key_then(complete, '"usage"', "{", 1)
      local texts = {}
      produced_text(usage and string.sub(complete, 1, usage) or complete, texts)
      -- Fetched per use: Envoy's Lua objects do not outlive a yield.
      local md = handle:streamInfo():dynamicMetadata()
      if #texts > 0 then
        n = n + 1
        md:set(STREAM_NS, "t" .. n, table.concat(texts))
      end
      if usage then
        counted = true -- the provider counted: nothing is left to count here
        md:set(STREAM_NS, "prompt", "")
      end
    end
    if trace and complete ~= "" then
      local md = handle:streamInfo():dynamicMetadata()
      trace_answer(md, complete, first)
      first = false
      if key_then(complete, '"usage"', "{", 1) then trace_usage(md, complete) end
    end
    if key_then(complete, '"choices"', "%[%s*%]", 1) then
      local kept, dropped = kept_events(complete, strip) -- some event may have to go
      if dropped then
        complete, rewrite = kept, true
      end
    end
    if rewrite or pending ~= "" then chunk:setBytes(complete) end
  end
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
  if marks["trace"] then
    local md = handle:streamInfo():dynamicMetadata()
    trace_answer(md, text, true)
    trace_usage(md, text)
    if total ~= nil then md:set("llmux", "cost", total) end
  end
  if total ~= nil then
    handle:streamInfo():dynamicMetadata():set("llmux.usage", "cost", total)
    local value = string.format("%.17g", total)
    handle:headers():replace("x-llmux-response-cost", value)
    handle:headers():replace("x-litellm-response-cost", value)
  end
end

-- The processor's marks arrive as a response header (what an upstream filter writes as
-- metadata stays on its attempt): `key=<t><value>;...`, t = b(ool), n(umber), s(tring,
-- percent-encoded). They become the `llmux` metadata the access log reads.
local function take_marks(handle)
  local headers = handle:headers()
  local raw = headers:get("x-llmux-marks")
  if raw == nil then return nil end
  headers:remove("x-llmux-marks")
  local md = handle:streamInfo():dynamicMetadata()
  local marks = {}
  for key, t, value in string.gmatch(raw, "([^;=]+)=(%a)([^;]*)") do
    local v
    if t == "b" then v = value == "1"
    elseif t == "n" then v = tonumber(value)
    elseif string.find(value, "%", 1, true) then
      v = string.gsub(value, "%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end)
    else v = value end
    marks[key] = v
    md:set("llmux", key, v)
  end
  return marks
end

function envoy_on_response(handle)
  local marks = take_marks(handle)
  if marks == nil then return end
  if marks["stream"] then
    stream(handle, marks["strip_usage"], marks["trace"])
  elseif marks["body_usage"] then
    body_usage(handle, marks)
  end
end
