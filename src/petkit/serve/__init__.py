"""Serving adapters: the batching engine (engine.py) under `petkit chat` / `generate` (cli.py) and
the OpenAI-compatible HTTP server `petkit serve` (http.py). Import the submodules you need; this
package imports nothing itself, so `import petkit` stays light."""
