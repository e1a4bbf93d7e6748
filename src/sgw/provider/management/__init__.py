"""The management plane: accounts and their API tokens, gateways and their activation, what
an admin sets on volumes (CHAP credentials, snapshot schedules) and the listings."""
