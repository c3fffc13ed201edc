"""Stand-in (see tests/hosts/webui/README.md)."""
