"""The control plane: the config, Envoy's configuration generated from it, the supervisor
(processes, reload, drain) and the endpoint health and weights it pushes to Envoy (inline in
the group clusters, through CDS)."""
