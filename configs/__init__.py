"""Configuration building blocks: the default schema and named presets (no side effects)."""
