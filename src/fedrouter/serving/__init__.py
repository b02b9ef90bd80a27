"""A finished run's router and adapters, put to use: `fedrouter predict` and the OpenAI-compatible
`fedrouter serve`.

- `finished_run`: the one core both share -- load a finished run (its config, base model, adapters and
  router, every file checked), route prompts to adapters, encode prompts as the run's evaluation does.
  It is the only module here that reads a run directory or loads a model (an import contract says so).
- `predict`: the `fedrouter predict` command.
- `schemas`: the OpenAI request bodies, what this server refuses of them, and its error bodies.
- `batcher`: the run's model behind a queue: one worker thread routes and generates batches of requests.
- `formats`: how a generated answer is written, whole or streamed, per endpoint.
- `endpoints`: the API, declared once: one row per endpoint (path, request model, handler, formatter).
- `guard`, `app`, `lifecycle`: the ASGI middleware (Host, Origin, key), the application built from the
  endpoint table, and the process around it (flags, socket, uvicorn, drain on SIGTERM).
- `metrics`: the counters of GET /metrics.
"""
