"""The composition root: `build_node` wires the ledger, the economy, the engines, the trade core
and the channels (the HTTP skin, the mesh, RPC) into one `Node`. It sits above every channel;
only the CLI, the benches and the tests import it, and channels see a node only through the
Protocols in forge_cli.trade.seams."""
