"""What authenticates the provider and its callers beyond the HTTP layer: the nonce ledger
of signed requests (replay protection across processes) and the provider's own CA."""
