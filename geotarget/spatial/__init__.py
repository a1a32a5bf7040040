"""Where the devices are: the columnar store, the spatial index and its answers, divisions, shards."""
