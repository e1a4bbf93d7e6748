"""The blue-green swap of the gateway daemon: the handover record (record.py), the socket
between the two daemons (wire.py) and the protocol (swap.py). DESIGN.md section 5."""
