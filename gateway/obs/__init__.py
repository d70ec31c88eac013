"""Observability every layer uses: structured logs, metrics and traces."""
