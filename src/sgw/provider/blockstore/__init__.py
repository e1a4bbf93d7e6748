"""Object stores, chunk maps and snapshots of the block service."""
