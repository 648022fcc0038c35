"""The prefix cache: a conversation's next turn prefills only what is new, on every shard.

`index.py` is the pure bookkeeping (block keys, reuse depth, pins, LRU eviction by bytes),
shared by the entry (which names blocks and decides the reuse length) and the shards;
`snapshots.py` cuts mlx-lm caches into blocks and builds them back (MLX); `store.py` is a
shard's cache: the index and the blocks' arrays, on the shard's compute thread. Importing this
package loads no MLX.
"""
