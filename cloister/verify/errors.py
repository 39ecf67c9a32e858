"""The two domain errors of the verification library.

`DecodeError` means the bytes are not well-formed for their format (bad data).
`VerificationError` means they are well-formed but a check failed (bad claim).
Network failures are never either of these: callers keep "the data is bad" apart from
"we could not get the data".
"""


class CloisterError(Exception):
    """Base of every error Cloister raises on purpose."""


class DecodeError(CloisterError, ValueError):
    """Untrusted bytes do not parse as the format they claim to be.

    The message says what was wrong and where (a field name, an offset, a line number).
    The underlying exception, if any, is chained as __cause__.
    """


class VerificationError(CloisterError):
    """Well-formed data failed a verification check. The message names the check."""
