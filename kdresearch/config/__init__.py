"""A job's config: building its groups, checking what users typed, its identity and its run name."""

from kdresearch.config import resolvers  # noqa: F401  registers ${scaled_lr:...} and ${on_cuda:...} (presets)
