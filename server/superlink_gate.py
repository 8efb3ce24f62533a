"""Flower's SuperLink with its APIs split over two addresses, so that devices can reach the Fleet API
without reaching the Control and Runtime APIs.

Flower 1.42 serves the Fleet API (what SuperNodes call), the Control API (register SuperNodes,
start and stop runs, read their logs) and the Runtime API (what the ServerApp process and its
SuperExec call) on one HTTPS port, and the open-source SuperLink has no account authentication
for the Control API (its OIDC plugin ships only with Flower's enterprise edition). Whoever can
reach the port a device connects to could therefore register nodes and run code. This module
builds Flower's own SuperLink application (``flwr.superlink.main.create_app``, with the
configuration parsed by ``flower-superlink``'s own argument parser) and serves it twice:

- on the **public** address (``--host``/``--port``), only the exact paths of Flower's Fleet router
  (and ``/health``); everything else answers 404 before any Flower code runs;
- on **loopback** (``127.0.0.1:--control-port``), everything: the operator's ``flwr`` CLI and the
  SuperLink's own SuperExec (which Flower points at ``host:port`` of the configuration, here the
  loopback address) use it.

Both listeners use the same TLS certificate. Nothing here is cryptography: TLS is uvicorn's (the
standard library's ``ssl``), node authentication is Flower's, and the split is a path allowlist
per listening socket.

    python -m server.superlink_gate --control-port 9093 -- <flower-superlink arguments, with TLS and
                                                           --enable-supernode-auth>
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

LOOPBACK = "127.0.0.1"


def fleet_paths() -> frozenset[str]:
    """Every path the public listener serves: Flower's Fleet routes and the health check."""
    from flwr.superlink.routers.fleet.router import router as fleet_router

    return frozenset({*(route.path for route in fleet_router.routes), "/health"})


class PathAllowlist:
    """An ASGI wrapper that passes only HTTP requests for exactly one of ``allowed`` paths; any other
    request (another path, a path that only starts like an allowed one, a websocket) gets 404."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] == "lifespan":  # the public listener never runs the app's lifespan
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http" and scope.get("path") in self.allowed and not scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "http.response.body", "body": b"not found\n"})


def _flower_config(flower_args: list[str]):
    """The SuperLink configuration exactly as ``flower-superlink`` parses ``flower_args``."""
    from flwr.superlink.cli.flower_superlink import _parse_superlink_lifespan_config

    saved = sys.argv
    sys.argv = ["flower-superlink", *flower_args]
    try:
        return _parse_superlink_lifespan_config()
    finally:
        sys.argv = saved


async def _serve_both(control, fleet) -> None:
    """Serve both listeners; when either stops (a signal, a failure), stop the other."""
    async def watch() -> None:
        while not (control.should_exit or fleet.should_exit):
            await asyncio.sleep(0.2)
        control.should_exit = fleet.should_exit = True

    await asyncio.gather(control.serve(), fleet.serve(), watch())


def check_public_config(config: Any) -> None:
    """Refuse a configuration that would serve the Fleet API publicly without TLS or without SuperNode
    authentication: the public allowlist includes node registration, which only Flower's node
    authentication (registered public keys) restricts to the operator's devices."""
    if config.certificates is None:
        raise SystemExit("the SuperLink gate needs TLS (--ssl-ca-certfile, --ssl-certfile, --ssl-keyfile)")
    if not getattr(config, "enable_supernode_auth", False):
        raise SystemExit("the SuperLink gate needs SuperNode authentication (--enable-supernode-auth): without it "
                         "anyone who reaches the public port can register a node")


def serve(public_host: str, public_port: int, control_port: int, flower_args: list[str]) -> None:
    """Run the SuperLink: the Fleet API on ``public_host:public_port``, everything on loopback
    ``control_port``. ``flower_args`` are ``flower-superlink`` arguments without ``--host``/``--port``."""
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan
    from flwr.superlink.main import create_app

    legacy = [name for name in ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")
              if os.environ.get(name) == "1"]
    if legacy:  # these start Flower's gRPC Control/Fleet servers on addresses of their own, around the split
        raise SystemExit(f"unset {', '.join(legacy)}: the SuperLink gate serves the Control API on loopback only")
    config = _flower_config([*flower_args, "--host", LOOPBACK, "--port", str(control_port)])
    check_public_config(config)
    app = create_app(config, SuperLinkLifespan)
    common = dict(ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile, workers=1,
                  log_config=get_uvicorn_log_config(console_handler.level), access_log=True)
    control = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=control_port, lifespan="on", **common))
    fleet = uvicorn.Server(uvicorn.Config(PathAllowlist(app, fleet_paths()), host=public_host, port=public_port,
                                          lifespan="off", **common))
    asyncio.run(_serve_both(control, fleet))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=LOOPBACK, help="public interface of the Fleet API")
    parser.add_argument("--port", type=int, required=True, help="public port of the Fleet API")
    parser.add_argument("--control-port", type=int, required=True,
                        help="loopback port of the Control and Runtime APIs")
    args, rest = parser.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if args.port == args.control_port and args.host in (LOOPBACK, "localhost", "0.0.0.0", "::"):
        parser.error("--port and --control-port must differ")
    serve(args.host, args.port, args.control_port, rest)


if __name__ == "__main__":
    main()
