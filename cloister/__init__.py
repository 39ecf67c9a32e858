"""Cloister: an MCP control plane whose trusted half runs inside an AWS Nitro Enclave.

`cloister.verify` is the verification library shared by auditors, the relay, upstream
servers and the enclave. It imports neither grpc nor mcp.
"""

__version__ = "0.1.0"
