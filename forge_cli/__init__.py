"""forge: compute is money. Local LLM inference traded in compute units, recorded in a
signed, hash-chained, Merkle-checkpointed ledger that anyone can verify offline."""


def version() -> str:
    """The installed distribution's version (looked up on demand: importlib.metadata is slow)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("forge-cu")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+source"
