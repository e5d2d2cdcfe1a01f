"""The `llmux` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from llmux_extproc.control.config import Config, ConfigError, load_config
from llmux_extproc.observability import redact

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def _setup_logging() -> None:
    """Every LLMux process (supervisor, workers, commands) logs through this: one JSON
    object per line (observability/logs.py), its message and traceback redacted (keys,
    tokens, emails, phone and card numbers) as it is written. The few lines commands print
    (config errors and warnings, which quote config values) are redacted the same way; the
    config's llmux.log_level applies once it is read."""
    from llmux_extproc.observability.logs import setup_logging

    setup_logging()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llmux", description="LLMux LLM gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    p_run = sub.add_parser("run", help="start the gateway: ext_proc workers and Envoy")
    p_run.add_argument("--config", help="config file (default: the embedded mock config)")

    p_check = sub.add_parser("check-config", help="validate a config file")
    p_check.add_argument("config")

    p_envoy = sub.add_parser(
        "envoy-config", help="print the Envoy configuration generated from a config"
    )
    p_envoy.add_argument("config", nargs="?")
    p_envoy.add_argument("--runtime-dir", default="/run/llmux", help="where sockets would live")
    p_envoy.add_argument(
        "--mode",
        choices=("standalone", "mesh"),
        default="standalone",
        help="standalone: what `llmux run` gives Envoy; mesh: for your own Envoy, calling "
        "`llmux extproc` processes at --extproc",
    )
    p_envoy.add_argument(
        "--extproc", help="mesh: the processors' gRPC address, host:port (a Service name)"
    )
    p_envoy.add_argument(
        "--sink-port", type=int, default=19902, help="mesh: a free loopback port Envoy may use"
    )
    p_envoy.add_argument(
        "--extproc-tls-ca", help="mesh: the processors serve TLS signed by this CA"
    )
    p_envoy.add_argument("--extproc-tls-cert", help="mesh: Envoy's client certificate (mTLS)")
    p_envoy.add_argument("--extproc-tls-key", help="mesh: Envoy's client key (mTLS)")

    p_ext = sub.add_parser(
        "extproc", help="run one ext_proc server (sidecar use, or under llmux run)"
    )
    p_ext.add_argument("--config")
    p_ext.add_argument("--listen", required=True, help="unix:/path or host:port")
    p_ext.add_argument("--watch", action="store_true", help="reload when the config file changes")
    p_ext.add_argument("--tls-cert", help="serve gRPC over TLS with this PEM certificate")
    p_ext.add_argument("--tls-key", help="... and this PEM private key")
    p_ext.add_argument("--tls-client-ca", help="require client certificates signed by this CA")

    p_db = sub.add_parser("db", help="the virtual-key database (PostgreSQL)")
    db_sub = p_db.add_subparsers(dest="db_command", required=True)
    p_migrate = db_sub.add_parser(
        "migrate", help="create or update LLMux's tables (LiteLLM's schema, a subset)"
    )
    p_migrate.add_argument(
        "--config", help="config file (general_settings.database_url); else DATABASE_URL"
    )

    args = parser.parse_args(argv)
    _setup_logging()
    try:
        sys.exit(_dispatch(args))
    except ConfigError as exc:
        print(redact.redact(f"llmux: invalid config: {exc}"), file=sys.stderr)
        sys.exit(2)


def _envoy_verdict(config: Config) -> str | None:
    """What the Envoy LLMux ships says of the configuration generated from `config` (the
    bootstrap with the group clusters inline, as `llmux envoy-config` prints it): a check
    of LLMux's own cannot know every rule of Envoy's."""
    import tempfile

    from llmux_extproc.control.envoy_binary import EnvoyNotFound, envoy_rejects
    from llmux_extproc.control.envoy_config import RuntimePaths, bootstrap

    with tempfile.TemporaryDirectory(prefix="llmux-check-") as tmp:
        doc = bootstrap(config, RuntimePaths(Path(tmp)), static_clusters=True)
        try:
            return envoy_rejects(doc, Path(tmp))
        except EnvoyNotFound as exc:
            print(redact.redact(f"warning: not checked against Envoy: {exc}"))
            return None


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        from llmux_extproc.control.supervisor import run

        return run(args.config)
    if args.command == "check-config":
        config = load_config(args.config)
        for warning in config.warnings:
            print(redact.redact(f"warning: {warning}"))
        rejected = _envoy_verdict(config)
        if rejected:
            print(
                redact.redact(f"llmux: invalid config: Envoy rejects it: {rejected}"),
                file=sys.stderr,
            )
            return 2
        print(f"ok: {len(config.deployments)} deployments, models: {', '.join(config.model_names)}")
        return 0
    if args.command == "envoy-config":
        from llmux_extproc.control.envoy_config import RuntimePaths, bootstrap

        config = load_config(args.config)
        if args.mode == "mesh":
            from llmux_extproc.control.mesh import ProcessorTls, mesh_bootstrap

            if not args.extproc:
                print("llmux envoy-config: --mode mesh needs --extproc host:port", file=sys.stderr)
                return 2
            tls = None
            if args.extproc_tls_ca:
                tls = ProcessorTls(args.extproc_tls_ca, args.extproc_tls_cert, args.extproc_tls_key)
            doc = mesh_bootstrap(config, args.extproc, args.sink_port, tls)
        else:
            doc = bootstrap(config, RuntimePaths(Path(args.runtime_dir)), static_clusters=True)
        print(yaml.safe_dump(doc, sort_keys=False), end="")
        return 0
    if args.command == "extproc":
        from llmux_extproc.dataplane.server import ServerTls, run_worker

        server_tls = None
        if args.tls_cert or args.tls_key or args.tls_client_ca:
            if not (args.tls_cert and args.tls_key):
                print("llmux extproc: TLS needs both --tls-cert and --tls-key", file=sys.stderr)
                return 2
            ca = Path(args.tls_client_ca) if args.tls_client_ca else None
            server_tls = ServerTls(Path(args.tls_cert), Path(args.tls_key), ca)
        run_worker(args.config, args.listen, watch=args.watch, tls=server_tls)
        return 0
    if args.command == "db":
        return _migrate(args.config)
    raise AssertionError(args.command)


def _migrate(config_path: str | None) -> int:
    from llmux_extproc.db.migrate import MigrationError, migrate

    config = load_config(config_path)
    if not config.database_url:
        print(
            "llmux: no database configured: set general_settings.database_url or DATABASE_URL",
            file=sys.stderr,
        )
        return 2
    try:
        applied = migrate(config.database_url)
    except MigrationError as exc:
        print(redact.redact(f"llmux: {exc}"), file=sys.stderr)
        return 1
    print(f"applied: {', '.join(applied)}" if applied else "database schema up to date")
    return 0
