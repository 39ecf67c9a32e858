"""Run the enclave: `python -m enclave --listen vsock:5005 --config enclave.toml [--mock-nsm DIR]`.

gRPC is served on a private UNIX socket; the vsock bridge (`enclave.bridge`) exposes it on the
`--listen` endpoint. In production that is `vsock:PORT`; in mock mode, tests and laptops use
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
from collections.abc import Sequence
from pathlib import Path

from cloister.verify.errors import CloisterError
from enclave.bridge import Bridge, Endpoint
from enclave.config import load_config
from enclave.core import EnclaveCore
from enclave.nsm import Nsm

log = logging.getLogger("enclave")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cloister enclave", description="Run the Cloister enclave (the trusted half).")
    p.add_argument("--listen", required=True, metavar="ENDPOINT",
                   help="where the bridge listens: vsock:PORT (Nitro), unix:PATH or tcp:HOST:PORT (mock mode)")
    p.add_argument("--config", required=True, type=Path, metavar="FILE",
                   help="the measured enclave configuration (origin, admin keys, trust root)")
    p.add_argument("--mock-nsm", type=Path, metavar="DIR",
                   help="use a software NSM whose CA lives in DIR instead of /dev/nsm (not secure: CI and laptops)")
    p.add_argument("--workers", type=int, default=16, help="gRPC worker threads (default 16)")
    return p


def _nsm(args: argparse.Namespace, config_raw: bytes) -> tuple[Nsm, dict[int, bytes], bool]:
    if args.mock_nsm is not None:
        from enclave.measure import mock_pcrs
        from enclave.mock_nsm import MockNsm

        pcrs = mock_pcrs(config_raw)
        log.warning("MOCK NSM in use: attestation documents are signed by the local CA in %s, not by AWS. "
                    "Never use this mode for real workloads.", args.mock_nsm)
        return MockNsm(args.mock_nsm, pcrs), pcrs, True
    from enclave.nsm import DevNsm

    nsm = DevNsm.open()
    return nsm, {i: nsm.describe_pcr(i) for i in (0, 1, 2)}, False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The bridge's pump threads wake on every gRPC frame; a shorter GIL switch interval (default
    # 5 ms) lets them run while a decision is being computed instead of waiting it out.
    sys.setswitchinterval(float(os.environ.get("CLOISTER_SWITCH_INTERVAL", "0.0005")))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s enclave %(levelname)s %(message)s", stream=sys.stderr)
    try:
        listen = Endpoint.parse(args.listen)
        config = load_config(args.config)
        nsm, pcrs, mock = _nsm(args, config.raw)
    except (CloisterError, OSError) as exc:
        print(f"cloister enclave: {exc}", file=sys.stderr)
        return 2
    if listen.kind != "vsock" and not mock:
        log.warning("listening on %s rather than vsock outside mock mode", listen)

    from enclave.service import serve

    core = EnclaveCore(config, nsm, pcrs=pcrs, clock_ms=lambda: time.time_ns() // 1_000_000, mock_nsm=mock)
    if listen.kind == "unix":
        # Beside the public socket and reused across restarts: a SIGKILL leaves nothing behind in /tmp.
        private = Path(listen.path).with_name(Path(listen.path).name + ".private")
        private.mkdir(mode=0o700, exist_ok=True)
        (private / "grpc.sock").unlink(missing_ok=True)
    else:
        private = Path(tempfile.mkdtemp(prefix="cloister-enclave-"))
    grpc_socket = private / "grpc.sock"
    server = serve(core, str(grpc_socket), workers=args.workers)
    try:
        bridge = Bridge(listen, Endpoint(kind="unix", path=str(grpc_socket))).start()
    except OSError as exc:
        server.stop(0)
        print(f"cloister enclave: cannot listen on {listen}: {exc.strerror}", file=sys.stderr)
        return 2

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(json.dumps({"event": "ready", "listen": str(bridge.listen_endpoint), "pcr0": pcrs.get(0, b"").hex(),
                      "mock_nsm": mock, "origin": config.origin}), flush=True)
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
