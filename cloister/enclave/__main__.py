"""Run the enclave: `python -m cloister.enclave --listen vsock:5005 --config enclave.toml`.

This is the image's entry point, and it knows only the real NSM (`/dev/nsm`). The mock NSM is
development code outside the image: `cloister enclave --mock-nsm DIR` (`cloister.dev.enclave`)
builds one and calls `run` below with it, so both modes serve through the same code.

gRPC is served on a private UNIX socket; the vsock bridge (`cloister.wire.bridge`) exposes it on
the `--listen` endpoint. In production that is `vsock:PORT`; in mock mode, tests and laptops use
`unix:PATH` or `tcp:HOST:PORT`, and only the socket family differs.

When ready, one JSON line is printed to stdout: {"event": "ready", "listen": ..., "pcr0": ...}.
"""

from __future__ import annotations

import argparse
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

from cloister.enclave.config import EnclaveConfig, load_config
from cloister.enclave.core import EnclaveCore
from cloister.enclave.nsm import Nsm
from cloister.verify.errors import CloisterError
from cloister.wire.bridge import Bridge, Endpoint

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
    return p


NsmFactory = Callable[[EnclaveConfig], tuple[Nsm, dict[int, bytes]]]


def _dev_nsm(_config: EnclaveConfig) -> tuple[Nsm, dict[int, bytes]]:
    from cloister.enclave.nsm import DevNsm

    nsm = DevNsm.open()
    return nsm, {i: nsm.describe_pcr(i) for i in (0, 1, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.listen, args.config, workers=args.workers, nsm_factory=_dev_nsm, mock=False)


def run(listen_spec: str, config_path: Path, *, workers: int, nsm_factory: NsmFactory, mock: bool) -> int:
    """Serve until SIGTERM/SIGINT; 2 when the endpoint, config or NSM cannot be used."""
    # The bridge's pump threads wake on every gRPC frame; a shorter GIL switch interval (default
    # 5 ms) lets them run while a decision is being computed instead of waiting it out.
    sys.setswitchinterval(float(os.environ.get("CLOISTER_SWITCH_INTERVAL", "0.0005")))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s enclave %(levelname)s %(message)s", stream=sys.stderr)
    try:
        listen = Endpoint.parse(listen_spec)
        config = load_config(config_path, mock_nsm=mock)  # a mock root only with the mock NSM, and back
        nsm, pcrs = nsm_factory(config)
    except (CloisterError, OSError) as exc:
        print(f"cloister enclave: {exc}", file=sys.stderr)
        return 2
    if listen.kind != "vsock" and not mock:
        log.warning("listening on %s rather than vsock outside mock mode", listen)

    from cloister.enclave.service import serve

    core = EnclaveCore(config, nsm, pcrs=pcrs, clock_ms=lambda: time.time_ns() // 1_000_000, mock_nsm=mock)
    if listen.kind == "unix":
        # Beside the public socket and reused across restarts: a SIGKILL leaves nothing behind in /tmp.
        private = Path(listen.path).with_name(Path(listen.path).name + ".private")
        private.mkdir(mode=0o700, exist_ok=True)
        (private / "grpc.sock").unlink(missing_ok=True)
    else:
        private = Path(tempfile.mkdtemp(prefix="cloister-enclave-"))
    grpc_socket = private / "grpc.sock"
    server = serve(core, str(grpc_socket), workers=workers)
    try:
        bridge = Bridge(listen, Endpoint(kind="unix", path=str(grpc_socket))).start()
    except OSError as exc:
        server.stop(0)
        print(f"cloister enclave: cannot listen on {listen}: {exc.strerror}", file=sys.stderr)
        return 2

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(
        json.dumps(
            {
                "event": "ready",
                "listen": str(bridge.listen_endpoint),
                "pcr0": pcrs.get(0, b"").hex(),
                "mock_nsm": mock,
                "origin": config.origin,
            }
        ),
        flush=True,
    )
    log.info("serving on %s (origin %s, PCR0 %s)", bridge.listen_endpoint, config.origin, pcrs.get(0, b"").hex())
    stop.wait()
    log.info("stopping")
    bridge.stop()
    server.stop(grace=2).wait(3)
    grpc_socket.unlink(missing_ok=True)
    private.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
