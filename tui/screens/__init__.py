"""Dashboard screens: help, confirmation, trade detail."""
