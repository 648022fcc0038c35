"""The ring's wire: frames (built and checked in `frames.py`), the tensor codec, the links
between members over gRPC or an in-memory network, and the cluster key's authentication."""
