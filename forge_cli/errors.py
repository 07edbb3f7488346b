"""Every error forge raises on purpose, in one tree, each mapped to one exit code and status.

                                    exit HTTP
    ForgeError                      2    400  anything forge reports to a user
    ├── UsageError                  2    400  bad arguments or input the user can fix
    │   ├── UnknownModel            2    404  a model name that resolves to nothing
    │   ├── MeshNotRunning          2    404  a mesh route on a node started without --mesh
    │   ├── SelfTrade               2    403  the operator buying from its own node
    │   ├── TokenRefused            2    401  the node refused the API token (missing, wrong, revoked)
    │   ├── NotFound                2    404  a ledger entry, agent run or other thing that is not there
    │   ├── Forbidden               2    403  a valid token asking for what only another may do
    │   ├── CanonicalError          2    400  a value with no canonical JSON encoding (float, NaN, …)
    │   ├── BadJSON                 2    400  JSON from outside that forge will not read: invalid,
    │   │                                     too large, too deep or a non-finite number
    │   ├── PromptTooLong           2    413  a prompt longer than the model's context can hold
    │   └── BodyTooLarge            2    413  a request body over the node's size limit
    ├── ConfigError                 2    400  config.toml or FORGE_* holds an unknown key, a wrong
    │                                         type or a value out of range
    ├── IdentityError               2    400  a key file is missing, unreadable, malformed or too open
    ├── StorageError                2    500  a file could not be read or written
    │   └── NodeUnreachable         2    503  no node answered at the URL (refused, reset, timed out)
    ├── ModelError                  2    503  a model file is missing, corrupt or cannot be loaded
    │   ├── OfflineError            2    503  a download was needed but the network is not available
    │   └── RpcUnavailable          2    503  this llama.cpp build lacks the RPC backend (GGML_RPC)
    ├── Throttled                   2    429  a sender refused too often this minute must wait
    ├── EngineBusy                  2    429  the model's request queue is full
    │   ├── GossipBusy              2    429  too many gossiped batches are waiting to be verified
    │   ├── GossipQuota             2    429  a source, or all sources together, used their gossip quota
    │   ├── FeedFull                2    429  the live event feed serves as many subscribers as it holds
    │   └── RecheckBusy             2    429  the dispute re-check queue is full, or an auditor used its
    │                                         per-minute re-checks (`retry_after_s` says when to retry)
    ├── LedgerError                 2    500  the ledger cannot be opened or used
    │   ├── LedgerLocked            2    500  another process holds the writer lock
    │   ├── LedgerFilesChanged      2    503  the ledger's files were deleted or replaced under the node
    │   └── EntryRejected           2    409  an append broke a rule (balance, nonce, schema); nothing written
    ├── CheckFailed                 1    422  a check ran and the answer is "no"
    │   ├── TamperDetected          1    500  also a LedgerError: the ledger or an imported file fails
    │   ├── ProofFailed             1    422  also a LedgerError: a Merkle proof or checkpoint fails
    │   ├── TradeRejected           1    422  a gossiped trade is malformed, forged or replays a nonce
    │   ├── DisputeRejected         1    422  a dispute is malformed, forged, or does not re-check
    │   │   └── NoStanding          1    403  its auditor holds no standing here, or its trade is neither
    │   │                                     held here nor its auditor's own purchase; nothing recorded
    │   └── PlanRejected            1    422  an agent plan is malformed or not a DAG (recorded)
    ├── NodeError                   2    502  the node answered with an error no class here names
    │   └── BadResponse             2    502  the node's answer is not JSON, or its stream is malformed
    │                                         or broke off before it ended
    ├── SpendDenied                 1    403  a safety gate or the balance refused a spend (`gate` names it)
    │   ├── InsufficientCU          1    402  gate "balance": the balance cannot cover the quote
    │   ├── KillSwitchActive        1    423  gate "kill_switch": every spend is stopped
    │   ├── SpendCapExceeded        1    403  gate "per_request_cap": one spend above the cap
    │   ├── BreakerOpen             1    403  gate "circuit_breaker": too many errors or spends
    │   ├── BudgetExceeded          1    403  gate "hourly_budget" or "lifetime_budget"
    │   ├── ApprovalRequired        1    202  gate "approval": a person must approve `approval_id`
    │   ├── TooManyStrangers        1    429  gate "rate_limit": the peer free tier is full
    │   ├── UnsettledExposure       1    403  gate "exposure": a peer left too many terms unsigned
    │   ├── NodeRefused             1    403  the node refused a spend with a gate no class here names
    │   └── LendingDenied           1    403  a lending rule refused: gate "credit", "collateral_ratio",
    │                                         "term", "pool_share", "reserve", "rate_limit" (429),
    │                                         "default_halt" or "liquidity"
    └── MeshError                   1    502  a peer-to-peer purchase or sale failed; nothing recorded
        ├── NoProvider              1    503  no reachable, unflagged peer sells the model
        ├── ProviderFailed          1    502  the provider was unreachable, refused or stopped early
        ├── TermsRejected           1    502  the provider's signed terms do not match the quote
        ├── BadIntent               1    422  a consumer's quote, intent or countersignature is bad
        ├── Replay                  1    409  a nonce or trade that was already used, offered again
        ├── TunnelRefused           1    403  a layer peer refused the head's handshake or terms
        ├── TunnelUnpaid            1    402  a tunnel's bytes would pass what its head paid for
        └── PeerLost                1    502  a layer peer died or stalled mid-generation

    RunStopped                                an agent run must not start another call (control
                                              flow inside forge_cli.agents.run; never shown)

The CLI maps each class to an exit code in `exit_code_for`; the node answers with `http_status`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2


class ForgeError(Exception):
    """Base class: an expected failure with a message meant for a person."""

    exit_code = EXIT_USAGE
    http_status = 400

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(ForgeError):
    """Bad arguments or input that the user can correct."""


class UnknownModel(UsageError):
    """A model name that is neither in the catalog, a hf.co reference nor a .gguf path."""

    http_status = 404


class MeshNotRunning(UsageError):
    """A mesh route asked of a node that was started without `--mesh`."""

    http_status = 404


class SelfTrade(UsageError):
    """The operator token buying inference from its own node: nothing would change hands."""

    http_status = 403


class NotFound(UsageError):
    """A ledger entry, an agent run or another named thing the request asked for is not there."""

    http_status = 404


class Forbidden(UsageError):
    """A valid token asked for something only another account (usually the operator) may do."""

    http_status = 403


class CanonicalError(UsageError):
    """A value that has no canonical encoding (float, NaN, bytes, non-NFC text, …)."""


class BadJSON(UsageError):
    """JSON from a request or a peer that forge.wire refuses: invalid, too large, too deep, or
    holding a number that is not finite."""


class PromptTooLong(UsageError):
    """A prompt that cannot fit the model's context, refused by its size before tokenizing
    (or by its tokens after)."""

    http_status = 413


class BodyTooLarge(UsageError):
    """A request body larger than the node accepts (forge_cli.node.web.MAX_BODY)."""

    http_status = 413


class ConfigError(ForgeError):
    """config.toml or a FORGE_* variable holds an unknown key, a value of the wrong type or a
    value outside the key's range."""


class TokenRefused(UsageError):
    """The node answered 401: the API token is missing, wrong or revoked."""

    http_status = 401


class IdentityError(ForgeError):
    """A key file is missing, unreadable, malformed or readable by others."""


class StorageError(ForgeError):
    """A file or directory could not be read or written."""

    http_status = 500


class NodeUnreachable(StorageError):
    """No node answered at the URL: the connection was refused, reset or timed out."""

    http_status = 503


class ModelError(ForgeError):
    """A model file is missing, truncated or not a GGUF llama.cpp can load."""

    http_status = 503


class OfflineError(ModelError):
    """A download was needed while offline (HF_HUB_OFFLINE=1 or no network)."""


class RpcUnavailable(ModelError):
    """This llama.cpp build lacks the RPC backend (llama-cpp-python built without GGML_RPC)."""


class Throttled(ForgeError):
    """A sender (an address, an account, a peer's key) that was refused too often in the last
    minute: answered before any work, until `retry_after_s` seconds have passed."""

    http_status = 429

    def __init__(self, message: str, *, retry_after_s: int = 60, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after_s = retry_after_s


class EngineBusy(ForgeError):
    """The engine's bounded request queue is full; the caller may retry later."""

    http_status = 429


class GossipBusy(EngineBusy):
    """Too many pushed trade batches are already waiting for verification; retry shortly."""


class GossipQuota(EngineBusy):
    """A gossip source (an address) added its quota of foreign trades this hour, or the
    network view holds as many foreign trades as it keeps; nothing more is taken from it."""


class FeedFull(EngineBusy):
    """GET /v1/forge/events already serves as many subscribers as it holds open at once."""


class RecheckBusy(EngineBusy):
    """A dispute's re-check waits for no one: the bounded queue is full, or its auditor used
    its re-checks for this minute. `retry_after_s` is when a retry can be taken."""

    def __init__(self, message: str, *, retry_after_s: int = 60, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after_s = retry_after_s


class LedgerError(ForgeError):
    """The ledger cannot be opened, read or written."""

    http_status = 500


class LedgerLocked(LedgerError):
    """Another process is the ledger's writer; only one may be at a time."""


class LedgerFilesChanged(LedgerError):
    """The ledger's files on disk are no longer the ones the writer opened (deleted or replaced)."""

    http_status = 503


class EntryRejected(LedgerError):
    """An append broke a ledger rule; the transaction was rolled back and nothing was written."""

    http_status = 409


class CheckFailed(ForgeError):
    """A check ran to the end and failed (exit 1), as opposed to not being able to run."""

    exit_code = EXIT_CHECK_FAILED
    http_status = 422


class TamperDetected(CheckFailed, LedgerError):
    """The ledger, or a file offered for import, does not verify."""

    http_status = 500


class ProofFailed(CheckFailed, LedgerError):
    """A Merkle inclusion/consistency proof or a signed checkpoint does not verify."""


class DisputeRejected(CheckFailed):
    """An audit dispute is malformed, its signatures or bodies fail, it names a model this
    node cannot audit, or its evidence does not re-check here (then it counts against its
    author)."""


class NoStanding(DisputeRejected):
    """A dispute this node does not consider: its auditor has no standing here (see
    forge_cli.mesh.audit.standing_problem), or the trade it names is neither held here nor
    the auditor's own purchase. Refused before any model work, and nothing is recorded."""

    http_status = 403


class TradeRejected(CheckFailed):
    """A trade offered to the network view is malformed, carries a signature that does not
    verify, or reuses a consumer's nonce; nothing was added.

    `forged` is true for the first two, which an honest node never relays (it verifies every
    trade before storing it); a nonce clash can reach an honest node from two sides. `quota`
    is true for a trade left unread because its source had used its gossip quota."""

    def __init__(self, message: str, *, forged: bool = True, quota: bool = False,
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.forged = forged
        self.quota = quota


class PlanRejected(CheckFailed):
    """An agent plan (from a file or the coordinator model) is malformed or has a cycle, an
    unknown or a duplicate task; the rejection is recorded in the ledger."""


class NodeError(ForgeError):
    """The node answered with an error that no class here names (its code is unknown)."""

    http_status = 502


class BadResponse(NodeError):
    """The node's answer is not the JSON it should be, or its event stream carries a malformed
    line or broke off before its end."""


class SpendDenied(ForgeError):
    """A spend was refused by a safety gate or by the balance; `gate` names which."""

    exit_code = EXIT_CHECK_FAILED
    http_status = 403
    gate = "unknown"

    def __init__(self, message: str, *, gate: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        if gate is not None:
            self.gate = gate


class InsufficientCU(SpendDenied):
    """The consumer's available balance cannot cover the quoted maximum cost."""

    http_status = 402
    gate = "balance"


class KillSwitchActive(SpendDenied):
    """The kill switch is on: no spend of any kind succeeds until it is lifted."""

    http_status = 423
    gate = "kill_switch"


class SpendCapExceeded(SpendDenied):
    """One spend is larger than the account's per-request cap."""

    gate = "per_request_cap"


class BreakerOpen(SpendDenied):
    """The circuit breaker tripped (consecutive errors or a burst of spends) and has not reset."""

    gate = "circuit_breaker"


class BudgetExceeded(SpendDenied):
    """The spend would take the account over its hourly or lifetime budget (`gate` says which)."""

    gate = "hourly_budget"


class ApprovalRequired(SpendDenied):
    """The spend is above the approval threshold: a person must approve `approval_id` first."""

    http_status = 202
    gate = "approval"

    def __init__(self, message: str, *, approval_id: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.approval_id = approval_id


class TooManyStrangers(SpendDenied):
    """Already as many peer accounts as allowed live on this node's free tier."""

    http_status = 429
    gate = "rate_limit"


class UnsettledExposure(SpendDenied):
    """A peer consumer left too many served replies uncountersigned at this provider."""

    gate = "exposure"


class NodeRefused(SpendDenied):
    """The node refused a spend with a gate that no class here names."""


LENDING_GATES = ("credit", "collateral_ratio", "term", "pool_share", "reserve", "rate_limit",
                 "default_halt", "liquidity")


class LendingDenied(SpendDenied):
    """A lending-pool rule refused a borrow or withdrawal; `gate` names the rule."""

    gate = "credit"

    def __init__(self, message: str, *, gate: str, hint: str | None = None) -> None:
        if gate not in LENDING_GATES:
            raise ValueError(f"unknown lending gate {gate!r}")
        super().__init__(message, gate=gate, hint=hint)
        if gate == "rate_limit":
            self.http_status = 429


class MeshError(ForgeError):
    """A peer-to-peer purchase or sale failed; nothing was recorded for it."""

    exit_code = EXIT_CHECK_FAILED
    http_status = 502


class NoProvider(MeshError):
    """No reachable, unflagged peer sells the model asked for."""

    http_status = 503


class ProviderFailed(MeshError):
    """The provider could not be reached, refused, or stopped before its signed terms came."""


class TermsRejected(MeshError):
    """The provider's signed trade terms do not match the quote or what was received."""


class BadIntent(MeshError):
    """A consumer's quote, intent or countersignature is malformed, forged or expired."""

    http_status = 422


class Replay(MeshError):
    """A nonce or trade that was already used or settled was offered again."""

    http_status = 409


class TunnelRefused(MeshError):
    """A layer peer refused the head's terms or tunnel handshake (wrong key, expired terms)."""

    http_status = 403


class TunnelUnpaid(MeshError):
    """A layer peer's tunnel would carry more than its head's agreement allows (credit plus
    what the head paid for): the peer cuts it."""

    http_status = 402


class PeerLost(MeshError):
    """A layer peer of a split model died or stalled mid-generation; the request failed."""


class RunStopped(Exception):
    """An agent run must not start another call; `Run.halt` says why. Never reaches a person."""


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for an exception that reached the CLI boundary."""
    return exc.exit_code if isinstance(exc, ForgeError) else EXIT_USAGE
