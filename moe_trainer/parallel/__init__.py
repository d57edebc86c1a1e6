"""Distributed pieces that are not Ray-specific: topology, all-to-all, gradient sync."""
