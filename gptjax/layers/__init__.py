"""Building blocks: dense, norms, MLPs, embeddings and every attention kind."""
