"""The mesh shape: a platform's own Envoy calls `llmux extproc` processes over the network.

The stand-alone bootstrap (`envoy_config.bootstrap`) minus what needs LLMux's supervisor
beside Envoy: the processor cluster points at the processors' address (a Kubernetes
Service, resolved by DNS) instead of one Unix socket per worker, and the pieces that talk
to the supervisor go (its upstream-log server, which feeds cooldowns, the breaker and the
latency/usage/cost strategies; its metrics endpoint). What stays works as stand-alone:
routing per model group, retries and fallback across deployments and providers, per-attempt
translation and signing, Envoy's own outlier detection, accounting from the access log.

Derived from the same function as the stand-alone config, so the two cannot drift apart;
`tests/test_e2e_mesh.py` runs the result under a plain Envoy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmux_extproc.control import envoy_config, envoy_routing
from llmux_extproc.control.config import Config, ConfigError, Listen

# Stand-alone pieces the mesh has no use for, and why they go.
WITHOUT_SUPERVISOR = (
    envoy_config.CONTROL_CLUSTER,  # the supervisor's policies: not running in the mesh
    envoy_config.METRICS_CLUSTER,  # the supervisor serves /metrics; the processors do not
)


@dataclass(frozen=True, slots=True)
class ProcessorTls:
    """How Envoy reaches processors that serve TLS (`llmux extproc --tls-cert`): the CA
    that signed their certificate, and Envoy's own certificate when they require one."""

    ca: str
    cert: str | None = None
    key: str | None = None

    def transport_socket(self, sni: str) -> dict[str, Any]:
        context: dict[str, Any] = {
            "validation_context": {"trusted_ca": {"filename": self.ca}},
            "alpn_protocols": ["h2"],
        }
        if self.cert and self.key:
            context["tls_certificates"] = [
                {
                    "certificate_chain": {"filename": self.cert},
                    "private_key": {"filename": self.key},
                }
            ]
        return {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": sni,
                "common_tls_context": context,
            },
        }


def mesh_bootstrap(
    config: Config, extproc: str, sink_port: int = 19902, tls: ProcessorTls | None = None
) -> dict[str, Any]:
    """An Envoy bootstrap whose ext_proc filter calls the processors at `extproc`
    (`host:port`; a DNS name such as a headless Kubernetes Service is resolved by Envoy,
    one endpoint per pod). `sink_port`: a free loopback port for Envoy's internal sink
    listener (requests the processor answers itself are routed there)."""
    target = Listen.parse(extproc, "--extproc")
    if target.path is not None or not target.host or not target.port:
        raise ConfigError("--extproc: must be host:port (the processors' gRPC address)")
    # The runtime directory only names Unix sockets, all of which are replaced or removed.
    doc = envoy_config.bootstrap(
        config, envoy_config.RuntimePaths(Path("/nonexistent"), sink_port), static_clusters=True
    )
    resources = doc["static_resources"]
    resources["clusters"] = [
        _remote_processors(c, target.host, target.port, tls)
        if c["name"] in (envoy_routing.EXTPROC_CLUSTER, envoy_config.EXTPROC_LOG_CLUSTER)
        else c
        for c in resources["clusters"]
        if c["name"] not in WITHOUT_SUPERVISOR
    ]
    hcm = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    router = hcm["http_filters"][-1]["typed_config"]
    del router["upstream_log"]
    for host in hcm["route_config"]["virtual_hosts"]:
        host["routes"] = [
            r
            for r in host["routes"]
            if r.get("route", {}).get("cluster") != envoy_config.METRICS_CLUSTER
        ]
    return doc


def _remote_processors(
    cluster: dict[str, Any], host: str, port: int, tls: ProcessorTls | None
) -> dict[str, Any]:
    address = {"socket_address": {"address": host, "port_value": port}}
    extra = {"transport_socket": tls.transport_socket(host)} if tls else {}
    return {
        **extra,
        **cluster,
        "type": "STRICT_DNS",
        # `localhost` and dual-stack names resolve to ::1 first under Envoy's default (AUTO),
        # where a processor bound to 0.0.0.0 is not listening; IPv6-only clusters still
        # resolve (V4_PREFERRED falls back).
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": cluster["name"],
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }
