"""Updates on the appliance: the update agent (agent.py, its own process), release slots
installed from verified bundles (install.py), its persistent state (state.py)."""
