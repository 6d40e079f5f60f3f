"""Starting a gRPC server the same way in every tier that serves (the cloud, the tap): a thread
pool, the standard ``grpc.health.v1`` service, a clear one-line error when the address cannot be
bound. Imported only by servers (the edge never loads grpc)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kernel.errors import ConnectError

log = logging.getLogger(__name__)


def start_server(register: Callable[[grpc.Server], None], host: str, port: int, *, workers: int = 8,
                 services: Iterable[str] = (), hint: str = "",
                 start: bool = True) -> tuple[grpc.Server, int, health.HealthServicer]:
    """``register(server)`` adds the service handlers; port 0 picks a free port. Returns the running
    server, the bound port and the health servicer (SERVING for "" and each of ``services``).
    ``start=False``: bound (a busy port fails now) but not serving until the caller's
    ``server.start()``; clients connect meanwhile, but their channels are not ready."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        raise ConnectError(f"cannot listen on {host}:{port}: port in use or address not available{hint}")
    if start:
        server.start()
    for name in ("", *services):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer
