"""Shared ground: configuration, errors, run folders, durable file I/O. Imports nothing above it."""
