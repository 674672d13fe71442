"""Shared machinery of the training toolkit (see ARCHITECTURE in docs/design.md)."""
