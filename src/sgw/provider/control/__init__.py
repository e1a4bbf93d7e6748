"""Gateway control servers: long-poll hub, registration, forwarding (DESIGN.md section 3)."""
