"""Item and chat embeddings and the vector index (reserved: nothing here yet)."""

__all__: list[str] = []
