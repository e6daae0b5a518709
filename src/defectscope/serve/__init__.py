"""The station: serve a model over HTTP, keep every result, learn from corrections."""
