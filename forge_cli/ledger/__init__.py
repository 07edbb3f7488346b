"""The record: entries, the SQLite store, Merkle tree, signed checkpoints, verify and replay."""
