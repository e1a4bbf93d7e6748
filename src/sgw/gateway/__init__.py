"""The gateway daemon that runs on the appliance."""
