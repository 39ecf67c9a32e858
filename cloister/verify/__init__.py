"""Verification library shared by auditors, upstream servers, the relay and the enclave.

Everything here is pure: bytes in, typed values or a raised error out. It imports neither
grpc nor mcp, so an auditor can install and read it alone.
"""
