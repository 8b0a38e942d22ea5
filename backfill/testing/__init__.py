"""Test helpers for backfill: an in-process fake of the OpenAI embeddings API."""
