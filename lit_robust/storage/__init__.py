"""Files: checksummed atomic caches, loading without running code, JSON written atomically."""
