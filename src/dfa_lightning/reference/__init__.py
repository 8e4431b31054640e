"""Reference numbers of the paper (data only)."""
