"""OpenAI-compatible HTTP server (`swakv serve`).

Modules: `app` (FastAPI app, run_server), `routes` (completions endpoints),
`protocol` (request bodies, ApiError), `tokenize` (/tokenize, /detokenize), `state`
(per-app state and request guards), `async_engine` (the engine thread), `metrics`
(Prometheus), `logprobs` (OpenAI logprobs objects), `testing` (start a real server
process in tests).
"""
