"""`cloister witness`: a small standalone witness (https://c2sp.org/tlog-witness).

Untrusted by Cloister's enclave and independent of it, like a separate machine: its own state
directory, its own Ed25519 cosigning key, the logs it follows configured in a TOML file. It speaks
the C2SP add-checkpoint protocol, so a Cloister log can use it and public witnesses alike, and it
cosigns with C2SP tlog-cosignature Ed25519 cosignatures (cloister.verify.cosignature).

- `state`: the key, the per-origin latest cosigned checkpoint, written durably before answering.
- `config`: the logs file (origin -> the log's verifier keys).
- `protocol`: the add-checkpoint request, its checks in the spec's order, and the answer.
- `server`: the HTTP front (standard library http.server), with bounded requests.

It imports the verification library only; nothing here reads a clock (the CLI passes one in).
"""
