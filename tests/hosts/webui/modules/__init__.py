"""Stand-in `modules` package of the WebUIs (see ../README.md)."""
