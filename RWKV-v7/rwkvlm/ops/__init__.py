"""Operators with a plain reference beside each fast path (ops/wkv7/)."""
