"""The OpenAI-compatible server: see docs/SERVER.md."""
