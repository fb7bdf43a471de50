"""Caption retrieval over a memory bank: embedding model, FAISS index, ``Retriever``."""

from dit_mem.retrieval.embedder import DEFAULT_MODEL, Embedder, load_embedder
from dit_mem.retrieval.index import build_index, make_index, recall_at_k
from dit_mem.retrieval.retriever import RetrievalResult, Retriever

__all__ = [
    "DEFAULT_MODEL",
    "Embedder",
    "RetrievalResult",
    "Retriever",
    "build_index",
    "load_embedder",
    "make_index",
    "recall_at_k",
]
