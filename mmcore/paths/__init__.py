"""Save paths: a model set (and a parent) to a manifest plus payload blobs, and back."""
