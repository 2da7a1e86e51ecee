"""The lowest floor: storage (fsspec, atomic commit), a run's records (layout, manifests) and the one tolerant reader of them."""
