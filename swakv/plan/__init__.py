"""Capacity planning: KV pool sizes and concurrency under swakv's and other engines' rules."""
