"""A job's config: building its groups, checking what users typed, its identity and its run name."""
