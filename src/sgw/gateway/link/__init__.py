"""The gateway's link to the provider: its identity, activation, signed requests, the control
channel and its reply journal, the console's commands and the diagnostics bundle.

The data path below (``nbd``, ``volume``, ``lio``) never imports this package (the import
contracts in pyproject.toml); what it needs from the link it receives (an ``httpx.Auth``).
"""
