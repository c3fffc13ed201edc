"""Stand-in for Forge-only packages (see ../webui/README.md)."""
