"""Routing and resilience policy, as plain Python objects (no I/O, no Envoy, no gRPC).

The supervisor feeds them the per-attempt outcomes Envoy reports and pushes what they decide
(per-deployment health and load-balancing weight) back to Envoy as endpoint
`health_status` / `load_balancing_weight`.

- `health`: per-deployment cooldown (LiteLLM's router semantics) and circuit breaker.
- `strategies`: LiteLLM's routing strategies expressed as endpoint weights.
"""
