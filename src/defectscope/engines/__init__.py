"""Batch scoring engines: local (streaming, resumable); all write the same rows."""
