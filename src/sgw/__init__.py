"""sgw: a storage gateway appliance (iSCSI volumes on a durable log, data in an object store)."""

__version__ = "0.1.0"
