"""Trace simulation: the real scheduler, cache and allocators with a simulated clock."""
