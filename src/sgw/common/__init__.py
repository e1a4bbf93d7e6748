"""What the gateway and the provider share."""
