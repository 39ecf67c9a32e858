"""The auditor's tools: everything `cloister audit` does, as a library.

It verifies a Cloister log from the outside, trusting nothing the relay or its storage says:
checkpoints are believed because an attestation document, checked against a pinned trust root
and PCRs, binds the key that signed them; proofs are computed here from the raw tiles.

- `source`: read a log over HTTP or from a storage directory (timeouts and size caps).
- `state`: the checkpoints remembered per origin, to detect forks (split views).
- `attested`: fetch and verify an attested checkpoint; prove it consistent with the remembered one.
- `proofs`: inclusion and consistency proofs computed from tiles, with diagnostics.
- `replay`: recompute the whole tree, decode every entry, check the structure across entries.
- `receipt`: self-contained offline proofs of one entry (C2SP tlog-proof with extra data).

Like `cloister.verify`, this package imports neither grpc nor mcp.
"""
