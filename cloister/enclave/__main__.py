"""Run the enclave: `python -m cloister.enclave --listen vsock:5005 --config enclave.toml`.

This is the image's entry point, and it knows only the real NSM (`/dev/nsm`). The mock NSM is
development code outside the image: `cloister enclave --mock-nsm DIR` (`cloister.dev.enclave`)
builds one and calls `run` below with it, so both modes serve through the same code.

In production (`--listen vsock:PORT`) gRPC is served on a private UNIX socket and the vsock bridge
(`cloister.wire.bridge`, splice or copy) exposes it on the vsock port. In mock mode, tests and
laptops use `unix:PATH` or `tcp:HOST:PORT`, which gRPC serves itself: no bridge runs (`direct`),
unless `--bridge splice|copy` (or CLOISTER_BRIDGE) asks for one, as CI does to run the vsock
path with AF_UNIX in place of AF_VSOCK.

When ready, one JSON line is printed to stdout: {"event": "ready", "listen": ..., "pcr0": ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cloister.enclave.config import EnclaveConfig, load_config
from cloister.enclave.core import EnclaveCore
from cloister.enclave.nsm import Nsm
from cloister.verify.errors import CloisterError
from cloister.wire.bridge import (
    MODES,
    Bridge,
    BridgeMode,
    Endpoint,
    choose_mode,
    grpc_address,
    set_switch_interval,
)

if TYPE_CHECKING:
    import grpc

log = logging.getLogger("enclave")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cloister enclave", description="Run the Cloister enclave (the trusted half).")
    p.add_argument(
        "--listen",
        required=True,
        metavar="ENDPOINT",
        help="where the bridge listens: vsock:PORT (Nitro), unix:PATH or tcp:HOST:PORT (mock mode)",
    )
    p.add_argument(
        "--config",
        required=True,
        type=Path,
        metavar="FILE",
        help="the measured enclave configuration (origin, admin keys, trust root)",
    )
    p.add_argument("--workers", type=int, default=16, help="gRPC worker threads (default 16)")
    p.add_argument(
        "--bridge",
        choices=MODES,
        default=os.environ.get("CLOISTER_BRIDGE", "auto"),
        help="auto (default): direct for unix/tcp, splice for vsock; or force direct, splice or copy",
    )
    return p


NsmFactory = Callable[[EnclaveConfig], tuple[Nsm, dict[int, bytes]]]


def _dev_nsm(_config: EnclaveConfig) -> tuple[Nsm, dict[int, bytes]]:
    from cloister.enclave.nsm import DevNsm

    nsm = DevNsm.open()
    return nsm, {i: nsm.describe_pcr(i) for i in (0, 1, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.listen, args.config, workers=args.workers, nsm_factory=_dev_nsm, mock=False, bridge=args.bridge)


def run(
    listen_spec: str,
    config_path: Path,
    *,
    workers: int,
    nsm_factory: NsmFactory,
    mock: bool,
    bridge: str = "auto",
) -> int:
    """Serve until SIGTERM/SIGINT; 2 when the endpoint, config or NSM cannot be used."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s enclave %(levelname)s %(message)s", stream=sys.stderr)
    try:
        listen = Endpoint.parse(listen_spec)
        mode = choose_mode(listen, bridge)
        set_switch_interval(mode)
        config = load_config(config_path, mock_nsm=mock)  # a mock root only with the mock NSM, and back
        nsm, pcrs = nsm_factory(config)
    except (CloisterError, OSError) as exc:
        print(f"cloister enclave: {exc}", file=sys.stderr)
        return 2
    if listen.kind != "vsock" and not mock:
        log.warning("listening on %s rather than vsock outside mock mode", listen)

    core = EnclaveCore(config, nsm, pcrs=pcrs, clock_ms=lambda: time.time_ns() // 1_000_000, mock_nsm=mock)
    try:
        server, public, cleanup = _serve(core, listen, mode, workers)
    except OSError as exc:
        print(f"cloister enclave: cannot listen on {listen}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(
        json.dumps(
            {
                "event": "ready",
                "listen": str(public),
                "bridge": mode,
                "pcr0": pcrs.get(0, b"").hex(),
                "mock_nsm": mock,
                "origin": config.origin,
            }
        ),
        flush=True,
    )
    log.info("serving on %s (origin %s, PCR0 %s)", public, config.origin, pcrs.get(0, b"").hex())
    stop.wait()
    log.info("stopping")
    cleanup()
    server.stop(grace=2).wait(3)
    return 0


def _serve(
    core: EnclaveCore, listen: Endpoint, mode: BridgeMode, workers: int
) -> tuple[grpc.Server, Endpoint, Callable[[], None]]:
    """Start gRPC on `listen` itself (`direct`) or behind a bridge; the public endpoint and how to
    tear down what was set up here. Logs the choice: `bridge: direct (...)`, or the bridge's."""
    from cloister.enclave.service import serve

    if mode == "direct":
        if listen.kind == "unix":
            Path(listen.path).unlink(missing_ok=True)
            old = os.umask(0o177)  # the socket is born 0600, as the bridge's is
            try:
                server, _ = serve(core, grpc_address(listen), workers=workers)
            finally:
                os.umask(old)
            log.info("bridge: direct (gRPC listens on %s itself)", listen)
            return server, listen, lambda: Path(listen.path).unlink(missing_ok=True)
        server, port = serve(core, grpc_address(listen), workers=workers)
        public = Endpoint(kind="tcp", host=listen.host, port=port)
        log.info("bridge: direct (gRPC listens on %s itself)", public)
        return server, public, lambda: None
    if listen.kind == "unix":
        # Beside the public socket and reused across restarts: a SIGKILL leaves nothing behind in /tmp.
        private = Path(listen.path).with_name(Path(listen.path).name + ".private")
        private.mkdir(mode=0o700, exist_ok=True)
        (private / "grpc.sock").unlink(missing_ok=True)
    else:
        private = Path(tempfile.mkdtemp(prefix="cloister-enclave-"))
    grpc_socket = private / "grpc.sock"
    server, _ = serve(core, f"unix:{grpc_socket}", workers=workers)
    try:
        bridge = Bridge(listen, Endpoint(kind="unix", path=str(grpc_socket)), mode=mode).start()
    except OSError:
        server.stop(0)
        raise

    def cleanup() -> None:
        bridge.stop()
        grpc_socket.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            private.rmdir()

    return server, bridge.listen_endpoint, cleanup


if __name__ == "__main__":
    sys.exit(main())
