"""The OpenAI-style HTTP API; the entry node behind it is `dnet.entry`."""
