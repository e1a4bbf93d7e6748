"""The provider's health store: the gateways' reports in, series, events and the fleet out
(docs/health.md, "At the provider")."""
