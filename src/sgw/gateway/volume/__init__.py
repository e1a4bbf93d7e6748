"""Write log, extent index, base stores, destager."""
