"""The provider's HTTP API (OpenAPI at /openapi.json)."""
