"""Embedding providers: one small interface, embed(texts) -> vectors + usage."""
