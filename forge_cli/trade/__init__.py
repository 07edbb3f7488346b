"""The trade core: the one owner of reserve → generate → settle.

- `build.build_node(settings)` wires a node once (ledger, safety, wallet, markets, engines, mesh);
- `session.TradeSession` runs quote → reserve → generate → settle exactly once and releases the
  reservation on every way out;
- `wallet.Wallet` (balance, held, available, the one free tier) is the only way CU is spent;
- `seams` names, as Protocols, what sellers, forwarding and agents need of the node;
- `forwarding` buys a model this node lacks from a mesh peer.
"""
