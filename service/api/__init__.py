"""The HTTP API: routers in routes/, exception handlers, middleware and request helpers."""
