"""The relay's own HTTP credentials: the admin token (`/admin/*`) and the auditor token
(`GET /log/body/...`), each a bearer secret read from a file named in the relay config.

They are distinct roles: the relay refuses to start when both files hold the same token
(`cloister.relay.config`), an agent's JWT is neither, and each route accepts only its own. An
endpoint whose token is not configured is disabled (403), never open. Tokens are compared in
constant time.

These are not trust decisions about agents (only the enclave verifies agents' tokens): they
guard what the untrusted relay itself holds, so that anyone who can reach it cannot read stored
bodies or push bundles.
"""

from __future__ import annotations

import hmac
import re
from typing import Final

from starlette.requests import Request
from starlette.responses import JSONResponse

ADMIN: Final = "admin"
AUDITOR: Final = "auditor"
_SETTING = {ADMIN: "admin_token_file", AUDITOR: "auditor_token_file"}

# A log index in a path or a query: ASCII decimal, no sign, no leading zeros, below 2**64.
_INDEX = re.compile(r"0|[1-9][0-9]{0,19}")
MAX_INDEX: Final = (1 << 64) - 1


def presented_token(request: Request) -> str:
    """The request's bearer token, or ""."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def refuse_unless(request: Request, role: str, expected: str | None, what: str) -> JSONResponse | None:
    """None when the request carries the `role` token; otherwise the answer: 403 when the relay has
    no such token configured (the endpoint is disabled), 401 when the token is missing or wrong."""
    setting = _SETTING[role]
    if expected is None:
        return JSONResponse(
            {"error": f"{what} is disabled on this relay: it has no {role} token (set {setting} in its config)"},
            status_code=403,
        )
    given = presented_token(request)
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        return JSONResponse(
            {"error": f"{what} needs the {role} token: 'Authorization: Bearer <the token in {setting}>'"},
            status_code=401,
            headers={"WWW-Authenticate": f'Bearer realm="cloister-{role}"', "Cache-Control": "no-store"},
        )
    return None


def parse_index(text: str, name: str = "index") -> int:
    """A log index or tree size as sent by a client; ValueError with the message to answer (400)."""
    if not _INDEX.fullmatch(text):
        raise ValueError(f"{name} must be a decimal integer in [0, 2**64) without sign or leading zeros")
    value = int(text)
    if value > MAX_INDEX:
        raise ValueError(f"{name} must be below 2**64")
    return value
