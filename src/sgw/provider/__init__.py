"""The provider side: block service, database, control plane."""
