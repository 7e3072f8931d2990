"""`swakv bench serve`: a load-test client for any OpenAI-compatible server.

Modules: `workload` (the two standard workloads: shared-prefix multi-turn chat and
long documents, as token-id prompts from a seeded generator), `client` (one
streamed /v1/completions request, the /metrics sampler), `runner` (runs workloads
concurrently with a progress bar), `report` (percentiles, the table, JSON and the
timelines), `plot` (the PNG; needs the `plot` extra: matplotlib), `cli` (flags).
"""
