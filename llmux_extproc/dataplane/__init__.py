"""The data plane: what happens to one request, per attempt (ext_proc protocol, gateway
logic, request context, Envoy's access-log stream, SSE framing, response.lua)."""
