"""Run the enclave on the mock NSM (CI and laptops): `cloister enclave --mock-nsm DIR ...`.

The enclave image has no mock NSM: this launcher lives outside the TCB, builds a `MockNsm`
whose CA is in DIR and whose PCRs measure the TCB files (`cloister.dev.measure`), and hands it
to the image's own `cloister.enclave.__main__.run`. Everything past the NSM is the same code.
`run(..., mock=True)` loads the config for the mock NSM, so a config whose trust root is `aws`
(a production config) is refused here, as a `mock:` root is refused by the image's entry point.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from cloister.dev.measure import mock_pcrs
from cloister.dev.mock_nsm import MockNsm
from cloister.enclave.__main__ import build_parser, run
from cloister.enclave.config import EnclaveConfig
from cloister.enclave.nsm import Nsm

log = logging.getLogger("enclave")


def main(argv: Sequence[str] | None = None) -> int:
    parser: argparse.ArgumentParser = build_parser()
    parser.add_argument(
        "--mock-nsm",
        type=Path,
        metavar="DIR",
        required=True,
        help="use a software NSM whose CA lives in DIR instead of /dev/nsm (not secure: CI and laptops)",
    )
    args = parser.parse_args(argv)

    def mock_nsm(config: EnclaveConfig) -> tuple[Nsm, dict[int, bytes]]:
        pcrs = mock_pcrs(config.raw)
        log.warning(
            "MOCK NSM in use: attestation documents are signed by the local CA in %s, not by AWS. "
            "Never use this mode for real workloads.",
            args.mock_nsm,
        )
        return MockNsm(args.mock_nsm, pcrs), pcrs

    return run(args.listen, args.config, workers=args.workers, nsm_factory=mock_nsm, mock=True, bridge=args.bridge)


if __name__ == "__main__":
    sys.exit(main())
