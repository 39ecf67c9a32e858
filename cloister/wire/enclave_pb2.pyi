from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    ALLOW: _ClassVar[Decision]
    DENY: _ClassVar[Decision]

class DenyCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DENY_CODE_UNSPECIFIED: _ClassVar[DenyCode]
    DENY_CODE_BAD_ARGUMENTS: _ClassVar[DenyCode]
    DENY_CODE_UNAUTHENTICATED: _ClassVar[DenyCode]
    DENY_CODE_UNKNOWN_AGENT: _ClassVar[DenyCode]
    DENY_CODE_UNKNOWN_SERVER: _ClassVar[DenyCode]
    DENY_CODE_UNKNOWN_TOOL: _ClassVar[DenyCode]
    DENY_CODE_QUARANTINED: _ClassVar[DenyCode]
    DENY_CODE_POLICY: _ClassVar[DenyCode]
    DENY_CODE_NO_PERMIT: _ClassVar[DenyCode]
    DENY_CODE_LIMIT: _ClassVar[DenyCode]

class ActionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_KIND_TOOL: _ClassVar[ActionKind]
    ACTION_KIND_RESOURCE: _ClassVar[ActionKind]
    ACTION_KIND_PROMPT: _ClassVar[ActionKind]
    ACTION_KIND_SAMPLING: _ClassVar[ActionKind]
    ACTION_KIND_ELICITATION: _ClassVar[ActionKind]
    ACTION_KIND_ROOTS: _ClassVar[ActionKind]
DECISION_UNSPECIFIED: Decision
ALLOW: Decision
DENY: Decision
DENY_CODE_UNSPECIFIED: DenyCode
DENY_CODE_BAD_ARGUMENTS: DenyCode
DENY_CODE_UNAUTHENTICATED: DenyCode
DENY_CODE_UNKNOWN_AGENT: DenyCode
DENY_CODE_UNKNOWN_SERVER: DenyCode
DENY_CODE_UNKNOWN_TOOL: DenyCode
DENY_CODE_QUARANTINED: DenyCode
DENY_CODE_POLICY: DenyCode
DENY_CODE_NO_PERMIT: DenyCode
DENY_CODE_LIMIT: DenyCode
ACTION_KIND_TOOL: ActionKind
ACTION_KIND_RESOURCE: ActionKind
ACTION_KIND_PROMPT: ActionKind
ACTION_KIND_SAMPLING: ActionKind
ACTION_KIND_ELICITATION: ActionKind
ACTION_KIND_ROOTS: ActionKind

class ChannelRequests(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ChannelRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[ChannelRequest, _Mapping]]] = ...) -> None: ...

class ChannelResponses(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[ChannelResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[ChannelResponse, _Mapping]]] = ...) -> None: ...

class ChannelRequest(_message.Message):
    __slots__ = ("id", "authorize", "outcome", "filter_tools")
    ID_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    FILTER_TOOLS_FIELD_NUMBER: _ClassVar[int]
    id: int
    authorize: AuthorizeRequest
    outcome: OutcomeRequest
    filter_tools: FilterToolsRequest
    def __init__(self, id: _Optional[int] = ..., authorize: _Optional[_Union[AuthorizeRequest, _Mapping]] = ..., outcome: _Optional[_Union[OutcomeRequest, _Mapping]] = ..., filter_tools: _Optional[_Union[FilterToolsRequest, _Mapping]] = ...) -> None: ...

class ChannelError(_message.Message):
    __slots__ = ("status", "message")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    status: int
    message: str
    def __init__(self, status: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ChannelResponse(_message.Message):
    __slots__ = ("id", "authorize", "outcome", "filter_tools", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    FILTER_TOOLS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: int
    authorize: AuthorizeResponse
    outcome: OutcomeResponse
    filter_tools: FilterToolsResponse
    error: ChannelError
    def __init__(self, id: _Optional[int] = ..., authorize: _Optional[_Union[AuthorizeResponse, _Mapping]] = ..., outcome: _Optional[_Union[OutcomeResponse, _Mapping]] = ..., filter_tools: _Optional[_Union[FilterToolsResponse, _Mapping]] = ..., error: _Optional[_Union[ChannelError, _Mapping]] = ...) -> None: ...

class LogAppend(_message.Message):
    __slots__ = ("first_index", "entries", "checkpoint")
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    first_index: int
    entries: _containers.RepeatedScalarFieldContainer[bytes]
    checkpoint: bytes
    def __init__(self, first_index: _Optional[int] = ..., entries: _Optional[_Iterable[bytes]] = ..., checkpoint: _Optional[bytes] = ...) -> None: ...

class AuthorizeRequest(_message.Message):
    __slots__ = ("token", "server", "tool", "arguments_json", "request_id", "persisted_size", "payment_amount", "payment", "kind")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PERSISTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    token: str
    server: str
    tool: str
    arguments_json: bytes
    request_id: str
    persisted_size: int
    payment_amount: str
    payment: bytes
    kind: ActionKind
    def __init__(self, token: _Optional[str] = ..., server: _Optional[str] = ..., tool: _Optional[str] = ..., arguments_json: _Optional[bytes] = ..., request_id: _Optional[str] = ..., persisted_size: _Optional[int] = ..., payment_amount: _Optional[str] = ..., payment: _Optional[bytes] = ..., kind: _Optional[_Union[ActionKind, str]] = ...) -> None: ...

class LimitState(_message.Message):
    __slots__ = ("limit_id", "kind", "remaining", "retry_after_s")
    LIMIT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    limit_id: str
    kind: str
    remaining: str
    retry_after_s: float
    def __init__(self, limit_id: _Optional[str] = ..., kind: _Optional[str] = ..., remaining: _Optional[str] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class AuthorizeResponse(_message.Message):
    __slots__ = ("decision", "reason", "policy_ids", "deny_code", "grant", "log_index", "log", "agent", "limits", "denial")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_IDS_FIELD_NUMBER: _ClassVar[int]
    DENY_CODE_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DENIAL_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    reason: str
    policy_ids: _containers.RepeatedScalarFieldContainer[str]
    deny_code: str
    grant: bytes
    log_index: int
    log: LogAppend
    agent: str
    limits: _containers.RepeatedCompositeFieldContainer[LimitState]
    denial: DenyCode
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[str] = ..., policy_ids: _Optional[_Iterable[str]] = ..., deny_code: _Optional[str] = ..., grant: _Optional[bytes] = ..., log_index: _Optional[int] = ..., log: _Optional[_Union[LogAppend, _Mapping]] = ..., agent: _Optional[str] = ..., limits: _Optional[_Iterable[_Union[LimitState, _Mapping]]] = ..., denial: _Optional[_Union[DenyCode, str]] = ...) -> None: ...

class ToolRef(_message.Message):
    __slots__ = ("server", "tool", "kind")
    SERVER_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    server: str
    tool: str
    kind: ActionKind
    def __init__(self, server: _Optional[str] = ..., tool: _Optional[str] = ..., kind: _Optional[_Union[ActionKind, str]] = ...) -> None: ...

class FilterToolsRequest(_message.Message):
    __slots__ = ("token", "candidates")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    token: str
    candidates: _containers.RepeatedCompositeFieldContainer[ToolRef]
    def __init__(self, token: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[ToolRef, _Mapping]]] = ...) -> None: ...

class FilterToolsResponse(_message.Message):
    __slots__ = ("visible", "agent")
    VISIBLE_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    visible: _containers.RepeatedCompositeFieldContainer[ToolRef]
    agent: str
    def __init__(self, visible: _Optional[_Iterable[_Union[ToolRef, _Mapping]]] = ..., agent: _Optional[str] = ...) -> None: ...

class OutcomeRequest(_message.Message):
    __slots__ = ("decision_index", "result_sha256", "error", "duration_us", "persisted_size", "paid_amount", "response_sig")
    DECISION_INDEX_FIELD_NUMBER: _ClassVar[int]
    RESULT_SHA256_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DURATION_US_FIELD_NUMBER: _ClassVar[int]
    PERSISTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAID_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_SIG_FIELD_NUMBER: _ClassVar[int]
    decision_index: int
    result_sha256: bytes
    error: str
    duration_us: int
    persisted_size: int
    paid_amount: str
    response_sig: bytes
    def __init__(self, decision_index: _Optional[int] = ..., result_sha256: _Optional[bytes] = ..., error: _Optional[str] = ..., duration_us: _Optional[int] = ..., persisted_size: _Optional[int] = ..., paid_amount: _Optional[str] = ..., response_sig: _Optional[bytes] = ...) -> None: ...

class OutcomeResponse(_message.Message):
    __slots__ = ("log_index", "log")
    LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    log_index: int
    log: LogAppend
    def __init__(self, log_index: _Optional[int] = ..., log: _Optional[_Union[LogAppend, _Mapping]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: bytes
    def __init__(self, checkpoint: _Optional[bytes] = ...) -> None: ...

class AttestRequest(_message.Message):
    __slots__ = ("nonce", "include_checkpoint")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    include_checkpoint: bool
    def __init__(self, nonce: _Optional[bytes] = ..., include_checkpoint: _Optional[bool] = ...) -> None: ...

class AttestResponse(_message.Message):
    __slots__ = ("document", "checkpoint")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    document: bytes
    checkpoint: bytes
    def __init__(self, document: _Optional[bytes] = ..., checkpoint: _Optional[bytes] = ...) -> None: ...

class LoadPolicyRequest(_message.Message):
    __slots__ = ("bundle", "persisted_size")
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    PERSISTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    bundle: bytes
    persisted_size: int
    def __init__(self, bundle: _Optional[bytes] = ..., persisted_size: _Optional[int] = ...) -> None: ...

class LoadPolicyResponse(_message.Message):
    __slots__ = ("version", "bundle_sha256", "log")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    version: int
    bundle_sha256: bytes
    log: LogAppend
    def __init__(self, version: _Optional[int] = ..., bundle_sha256: _Optional[bytes] = ..., log: _Optional[_Union[LogAppend, _Mapping]] = ...) -> None: ...

class SyncLogRequest(_message.Message):
    __slots__ = ("persisted_size",)
    PERSISTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    persisted_size: int
    def __init__(self, persisted_size: _Optional[int] = ...) -> None: ...

class SyncLogResponse(_message.Message):
    __slots__ = ("log",)
    LOG_FIELD_NUMBER: _ClassVar[int]
    log: LogAppend
    def __init__(self, log: _Optional[_Union[LogAppend, _Mapping]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("origin", "log_public_key", "grant_public_key", "log_verifier_key", "policy_version", "policy_sha256", "log_size", "pcr0", "mock_nsm", "ready", "awaiting_key", "witness")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    LOG_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    GRANT_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    LOG_VERIFIER_KEY_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_SHA256_FIELD_NUMBER: _ClassVar[int]
    LOG_SIZE_FIELD_NUMBER: _ClassVar[int]
    PCR0_FIELD_NUMBER: _ClassVar[int]
    MOCK_NSM_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    AWAITING_KEY_FIELD_NUMBER: _ClassVar[int]
    WITNESS_FIELD_NUMBER: _ClassVar[int]
    origin: str
    log_public_key: bytes
    grant_public_key: bytes
    log_verifier_key: str
    policy_version: int
    policy_sha256: bytes
    log_size: int
    pcr0: bytes
    mock_nsm: bool
    ready: bool
    awaiting_key: bool
    witness: WitnessState
    def __init__(self, origin: _Optional[str] = ..., log_public_key: _Optional[bytes] = ..., grant_public_key: _Optional[bytes] = ..., log_verifier_key: _Optional[str] = ..., policy_version: _Optional[int] = ..., policy_sha256: _Optional[bytes] = ..., log_size: _Optional[int] = ..., pcr0: _Optional[bytes] = ..., mock_nsm: _Optional[bool] = ..., ready: _Optional[bool] = ..., awaiting_key: _Optional[bool] = ..., witness: _Optional[_Union[WitnessState, _Mapping]] = ...) -> None: ...

class AddCosignaturesRequest(_message.Message):
    __slots__ = ("cosigned_checkpoint",)
    COSIGNED_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    cosigned_checkpoint: bytes
    def __init__(self, cosigned_checkpoint: _Optional[bytes] = ...) -> None: ...

class WitnessState(_message.Message):
    __slots__ = ("required", "start_size", "witnessed_size", "granting", "reason")
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    START_SIZE_FIELD_NUMBER: _ClassVar[int]
    WITNESSED_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRANTING_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    required: bool
    start_size: int
    witnessed_size: int
    granting: bool
    reason: str
    def __init__(self, required: _Optional[bool] = ..., start_size: _Optional[int] = ..., witnessed_size: _Optional[int] = ..., granting: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ResumeFrom(_message.Message):
    __slots__ = ("checkpoint", "range_size", "range_hashes", "entries", "key_entry", "key_entry_index", "key_entry_proof", "boundary_entry", "boundary_proof")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    RANGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANGE_HASHES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    KEY_ENTRY_FIELD_NUMBER: _ClassVar[int]
    KEY_ENTRY_INDEX_FIELD_NUMBER: _ClassVar[int]
    KEY_ENTRY_PROOF_FIELD_NUMBER: _ClassVar[int]
    BOUNDARY_ENTRY_FIELD_NUMBER: _ClassVar[int]
    BOUNDARY_PROOF_FIELD_NUMBER: _ClassVar[int]
    checkpoint: bytes
    range_size: int
    range_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    entries: _containers.RepeatedScalarFieldContainer[bytes]
    key_entry: bytes
    key_entry_index: int
    key_entry_proof: _containers.RepeatedScalarFieldContainer[bytes]
    boundary_entry: bytes
    boundary_proof: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, checkpoint: _Optional[bytes] = ..., range_size: _Optional[int] = ..., range_hashes: _Optional[_Iterable[bytes]] = ..., entries: _Optional[_Iterable[bytes]] = ..., key_entry: _Optional[bytes] = ..., key_entry_index: _Optional[int] = ..., key_entry_proof: _Optional[_Iterable[bytes]] = ..., boundary_entry: _Optional[bytes] = ..., boundary_proof: _Optional[_Iterable[bytes]] = ...) -> None: ...

class StartLogRequest(_message.Message):
    __slots__ = ("resume",)
    RESUME_FIELD_NUMBER: _ClassVar[int]
    resume: ResumeFrom
    def __init__(self, resume: _Optional[_Union[ResumeFrom, _Mapping]] = ...) -> None: ...

class StartLogResponse(_message.Message):
    __slots__ = ("log",)
    LOG_FIELD_NUMBER: _ClassVar[int]
    log: LogAppend
    def __init__(self, log: _Optional[_Union[LogAppend, _Mapping]] = ...) -> None: ...

class ResumeChunk(_message.Message):
    __slots__ = ("start", "first_index", "entries")
    START_FIELD_NUMBER: _ClassVar[int]
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    start: ResumeFrom
    first_index: int
    entries: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, start: _Optional[_Union[ResumeFrom, _Mapping]] = ..., first_index: _Optional[int] = ..., entries: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ServerChallengeRequest(_message.Message):
    __slots__ = ("server", "reconnect")
    SERVER_FIELD_NUMBER: _ClassVar[int]
    RECONNECT_FIELD_NUMBER: _ClassVar[int]
    server: str
    reconnect: bool
    def __init__(self, server: _Optional[str] = ..., reconnect: _Optional[bool] = ...) -> None: ...

class ServerChallengeResponse(_message.Message):
    __slots__ = ("nonce", "kind")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    kind: str
    def __init__(self, nonce: _Optional[bytes] = ..., kind: _Optional[str] = ...) -> None: ...

class ServerReport(_message.Message):
    __slots__ = ("server", "evidence", "attestation", "artifact", "certificates", "failure", "tools_json", "persisted_size")
    SERVER_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    TOOLS_JSON_FIELD_NUMBER: _ClassVar[int]
    PERSISTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    server: str
    evidence: bool
    attestation: bytes
    artifact: bytes
    certificates: _containers.RepeatedScalarFieldContainer[bytes]
    failure: str
    tools_json: bytes
    persisted_size: int
    def __init__(self, server: _Optional[str] = ..., evidence: _Optional[bool] = ..., attestation: _Optional[bytes] = ..., artifact: _Optional[bytes] = ..., certificates: _Optional[_Iterable[bytes]] = ..., failure: _Optional[str] = ..., tools_json: _Optional[bytes] = ..., persisted_size: _Optional[int] = ...) -> None: ...

class ServerReportResponse(_message.Message):
    __slots__ = ("status", "detail", "hidden_tools", "log")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_TOOLS_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    status: str
    detail: str
    hidden_tools: _containers.RepeatedScalarFieldContainer[str]
    log: LogAppend
    def __init__(self, status: _Optional[str] = ..., detail: _Optional[str] = ..., hidden_tools: _Optional[_Iterable[str]] = ..., log: _Optional[_Union[LogAppend, _Mapping]] = ...) -> None: ...

class RequestKeyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RequestKeyResponse(_message.Message):
    __slots__ = ("attestation_document",)
    ATTESTATION_DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    attestation_document: bytes
    def __init__(self, attestation_document: _Optional[bytes] = ...) -> None: ...

class OpenSealedKeyRequest(_message.Message):
    __slots__ = ("ciphertext_for_recipient", "first_start")
    CIPHERTEXT_FOR_RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    FIRST_START_FIELD_NUMBER: _ClassVar[int]
    ciphertext_for_recipient: bytes
    first_start: bool
    def __init__(self, ciphertext_for_recipient: _Optional[bytes] = ..., first_start: _Optional[bool] = ...) -> None: ...

class OpenSealedKeyResponse(_message.Message):
    __slots__ = ("log_public_key", "log_verifier_key")
    LOG_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    LOG_VERIFIER_KEY_FIELD_NUMBER: _ClassVar[int]
    log_public_key: bytes
    log_verifier_key: str
    def __init__(self, log_public_key: _Optional[bytes] = ..., log_verifier_key: _Optional[str] = ...) -> None: ...
