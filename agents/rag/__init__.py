"""The retrieval-augmented generation path: chunking, the vector store, retrieval, generation, re-indexing."""
