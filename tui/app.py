"""The `forge tui` dashboard."""
