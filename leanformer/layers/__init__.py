"""Token mixers, linear layers, norms and positions that blocks are assembled from."""
