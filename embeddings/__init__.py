"""Item and chat embeddings and the vector index (not built yet: the package is reserved)."""
