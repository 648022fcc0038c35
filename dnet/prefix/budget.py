"""How much memory a node's prefix cache may take: one home for the default. Pure."""

from __future__ import annotations

# Unless `--prefix-cache-bytes` says otherwise, the cache takes what the plan leaves free on a
# node, up to 1/DEFAULT_SHARE of its memory budget. At 1/8, a 64 GB Mac (a 46 GB budget) keeps
# about 5.7 GB of prefixes: holding half of Qwen3-32B's layers (128 KiB of KV per token) that
# is some 45k tokens, an agent's system prompt, tools and files or a dozen conversations,
# while weights and the live requests' KV caches keep the rest. Taking only what the plan
# leaves means a model that fits resident never streams its weights because of the cache.
DEFAULT_SHARE = 8


def default_capacity(budget_bytes: int, planned_bytes: int) -> int:
    """The cache's default size on a node with `budget_bytes` of memory of which the plan
    fills `planned_bytes` (weights, KV cache for the context, reserve)."""
    return max(0, min(budget_bytes // DEFAULT_SHARE, budget_bytes - planned_bytes))
