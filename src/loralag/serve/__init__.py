"""The OpenAI-compatible server: the app and its endpoints (app), the continuous-batching engine (engine) and
its metrics (metrics).

Imports generation, routing and library; nothing imports it but the CLI.
"""
