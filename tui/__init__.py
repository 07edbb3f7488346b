"""The Textual dashboard (`forge tui`)."""
