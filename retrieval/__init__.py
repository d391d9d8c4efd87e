"""Retrieval: embeddings from a trained clipalign model into FAISS indexes, and search over them."""
