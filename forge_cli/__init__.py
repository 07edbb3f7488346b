"""forge: compute is money. Local LLM inference traded in compute units, recorded in a
signed, hash-chained, Merkle-checkpointed ledger that anyone can verify offline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("forge-cu")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
