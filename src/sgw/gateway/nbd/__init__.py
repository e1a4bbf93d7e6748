"""NBD protocol server."""
