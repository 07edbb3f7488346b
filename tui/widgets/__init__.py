"""Dashboard widgets: one per module, each with its CSS, bindings and messages."""
