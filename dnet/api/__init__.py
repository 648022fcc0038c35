"""The OpenAI-style HTTP API and the entry node that feeds requests into the ring."""
