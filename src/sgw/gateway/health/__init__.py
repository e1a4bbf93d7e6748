"""Health: the gateway's metrics (prometheus-client, a registry per daemon), the typed
health events and the reporter that uploads both to the provider (docs/health.md)."""
