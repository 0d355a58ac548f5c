"""The ``agentapi-proxy`` command."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace

from agentapi_proxy import client_cli, logconfig
from agentapi_proxy.errors import FailedPrecondition
from agentapi_proxy.settings import Settings, SettingsError, load_settings, unknown_env_names

logger = logging.getLogger("agentapi_proxy")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="agentapi-proxy",
        description="Run AI coding-agent servers as local processes or Kubernetes StatefulSets.",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="settings file (JSON or YAML); default: config.json/config.yaml in the current "
        "directory, ~/.agentapi/ and /etc/agentapi/",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the control plane and the HTTP gateway")
    commands.add_parser("control-plane", help="run only the gRPC control plane")
    commands.add_parser("gateway", help="run only the HTTP gateway")
    client_cli.add_commands(parser, commands)
    args = parser.parse_args(argv)
    if args.command in client_cli.COMMANDS:
        raise SystemExit(client_cli.run(args))
    client_cli.reject_connection_options(parser, args)

    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"agentapi-proxy: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logconfig.configure(settings.log)
    for name in unknown_env_names():
        logger.warning("environment variable %s names no setting and is ignored", name)

    try:
        asyncio.run(
            _run(
                settings,
                control_plane=args.command != "gateway",
                gateway=args.command != "control-plane",
            )
        )
    except SettingsError as exc:
        logger.error("%s", exc)
        raise SystemExit(2) from None


async def _run(settings: Settings, *, control_plane: bool, gateway: bool) -> None:
    from aiohttp import web

    from agentapi_proxy.auth import authenticator_from_settings
    from agentapi_proxy.server import ControlPlane

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    listen = [settings.server.grpc_listen] if control_plane else []
    listen += [settings.gateway.listen] if gateway else []
    authenticator = authenticator_from_settings(settings.auth, listen=listen)
    plane = ControlPlane(settings, authenticator=authenticator) if control_plane else None
    runner: web.AppRunner | None = None
    try:
        gateway_settings = settings.gateway
        if plane is not None:
            port = await plane.start()
            # In one process the gateway dials the port actually bound (it may be :0).
            host = settings.server.grpc_listen.rsplit(":", 1)[0]
            if host in {"0.0.0.0", "[::]", ""}:
                host = "127.0.0.1"
            gateway_settings = replace(gateway_settings, control_plane=f"{host}:{port}")
        if gateway:
            from agentapi_gateway.app import run_gateway

            try:
                runner = await run_gateway(
                    gateway_settings, shutdown_timeout=settings.server.shutdown_grace_seconds
                )
            except FailedPrecondition as exc:
                raise SettingsError(f"gateway.listen = {settings.gateway.listen!r}: {exc}") from exc
        # Start-up objects live for the whole run: keep the collector from rescanning them.
        gc.freeze()
        # Fewer young-generation collections: each request allocates many short-lived
        # objects, and collections were a sixth of the busy time under load.
        gc.set_threshold(50_000, 50, 100)
        await stop.wait()
        logger.info("shutting down")
    finally:
        # Both at once: the control plane ends its streams, which ends the gateway's,
        # so the whole process is gone within one grace period.
        closing = []
        if runner is not None:
            closing.append(runner.cleanup())
        if plane is not None:
            closing.append(plane.stop())
        for result in await asyncio.gather(*closing, return_exceptions=True):
            if isinstance(result, Exception):
                logger.warning("error while shutting down: %s", result)
