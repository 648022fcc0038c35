"""The ring's wire format and the persistent gRPC links between its members."""
