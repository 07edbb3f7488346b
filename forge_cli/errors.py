"""Every error forge raises on purpose, in one tree, each mapped to one exit code.

    ForgeError                      anything forge reports to a user (exit 2 unless noted)
    ├── UsageError                  bad arguments or input the user can fix
    │   └── UnknownModel            a model name that resolves to nothing
    ├── ConfigError                 config.toml or FORGE_* holds an unknown key or a wrong type
    ├── IdentityError               a key file is missing, unreadable, malformed or too open
    ├── StorageError                a file could not be read or written
    ├── ModelError                  a model file is missing, corrupt or cannot be loaded
    │   └── OfflineError            a download was needed but the network is not available
    ├── EngineBusy                  the model's request queue is full (HTTP 429)
    ├── LedgerError                 the ledger cannot be opened or used
    │   ├── LedgerLocked            another process holds the writer lock
    │   ├── EntryRejected           an append broke a rule (balance, nonce, schema); nothing written
    │   └── CheckFailed             exit 1: a check ran and the answer is "no"
    │       ├── TamperDetected      the ledger or an imported file does not verify
    │       └── ProofFailed         a Merkle proof or checkpoint does not verify
    └── SpendDenied                 exit 1: a safety gate or the balance refused a spend

The CLI maps each class to an exit code in `exit_code_for`; the node maps them to HTTP statuses.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2


class ForgeError(Exception):
    """Base class: an expected failure with a message meant for a person."""

    exit_code = EXIT_USAGE

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


class ConfigError(ForgeError):
    """config.toml or a FORGE_* variable holds an unknown key or a value of the wrong type."""


class IdentityError(ForgeError):
    """A key file is missing, unreadable, malformed or readable by others."""


class StorageError(ForgeError):
    """A file or directory could not be read or written."""


class ModelError(ForgeError):
    """A model file is missing, truncated or not a GGUF llama.cpp can load."""


class OfflineError(ModelError):
    """A download was needed while offline (HF_HUB_OFFLINE=1 or no network)."""


class EngineBusy(ForgeError):
    """The engine's bounded request queue is full; the caller may retry later."""


class LedgerError(ForgeError):
    """The ledger cannot be opened, read or written."""


class LedgerLocked(LedgerError):
    """Another process is the ledger's writer; only one may be at a time."""


class EntryRejected(LedgerError):
    """An append broke a ledger rule; the transaction was rolled back and nothing was written."""


class CheckFailed(ForgeError):
    """A check ran to the end and failed (exit 1), as opposed to not being able to run."""

    exit_code = EXIT_CHECK_FAILED


class TamperDetected(CheckFailed, LedgerError):
    """The ledger, or a file offered for import, does not verify."""


class ProofFailed(CheckFailed, LedgerError):
    """A Merkle inclusion/consistency proof or a signed checkpoint does not verify."""


class SpendDenied(ForgeError):
    """A spend was refused by a safety gate or by the balance."""

    exit_code = EXIT_CHECK_FAILED


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for an exception that reached the CLI boundary."""
    return exc.exit_code if isinstance(exc, ForgeError) else EXIT_USAGE
