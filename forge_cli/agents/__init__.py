"""Budgeted agent runs witnessed in the ledger (plan → dispatch → validate → synthesize).

`plan` parses and checks plans, `run` executes them inside the node, `record` reads runs
back from the ledger alone. Nothing here is imported by `forge --help`.
"""
