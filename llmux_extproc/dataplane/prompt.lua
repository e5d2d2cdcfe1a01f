-- Streamed requests only (enabled on the stream routes, envoy_routing): the request body is
-- kept for the access log, so that a stream Envoy passes through and that ends without the
-- provider's usage can still have its prompt counted with tiktoken. A filter of its own so
-- that no other request pays for a Lua call on its way in.
function envoy_on_request(handle)
  local body = handle:body()
  if body == nil then return end
  handle:streamInfo():dynamicMetadata():set("llmux.stream", "prompt", body:getBytes(0, body:length()))
end
