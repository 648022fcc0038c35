"""A shard process: some of a model's layers behind the Ring gRPC service."""
