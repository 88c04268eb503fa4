"""Compression transforms as pure functions over arrays and pytrees (no model code, no state)."""
