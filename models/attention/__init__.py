"""One module per mechanism; each defines MECHANISM, a registry entry."""
