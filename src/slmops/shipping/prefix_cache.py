"""KV of prompt prefixes, kept in blocks: a prompt that starts like an earlier one (a chat template's
system prompt, a conversation's earlier turns) is prefilled from where its cached blocks end.

Blocks are BLOCK tokens, chained by blake2b (each block's key covers every token before it) per
adapter, since LoRA on k/v changes the cache. Reusing them does not change an answer: ONNX
Runtime gives bit-identical logits whether a prompt is prefilled whole or in two chunks (measured:
SmolLM2 int4, with and without an adapter). The last two prompt tokens are always computed, so no
prefill is one row of one token (see Scheduler._decode). Least recently used blocks go first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

BLOCK = 8  # tokens


@dataclass
class Block:
    adapter: int
    parent: bytes  # the key of the block before it (or of the adapter, for the first)
    tokens: tuple[int, ...]
    kv: list[np.ndarray]  # one [kv_heads, BLOCK, head_size] slice per cache buffer


class PrefixCache:
    def __init__(self, max_bytes: int, block_bytes: int):
        self.max_blocks = max_bytes // max(block_bytes, 1)
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()
        self.hits = self.misses = 0  # prompt tokens taken from the cache, and computed

    def _chain(self, tokens: list[int], adapter: int) -> list[tuple[bytes, bytes, tuple[int, ...]]]:
        """(key, parent key, block tokens) for every full block of `tokens`. Keys are blake2b digests
        chained over the blocks: Python's hash() of ints can be made to collide on purpose, and a
        collision would serve one prompt's cache to another."""
        import hashlib

        out, parent = [], hashlib.blake2b(f"adapter {adapter}".encode(), digest_size=16).digest()
        for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
            block = tuple(tokens[start : start + BLOCK])
            key = hashlib.blake2b(parent + np.asarray(block, dtype=np.int64).tobytes(), digest_size=16).digest()
            out.append((key, parent, block))
            parent = key
        return out

    def lookup(self, tokens: list[int], adapter: int) -> list[Block]:
        """The cached blocks the prompt starts with, leaving at least two of its tokens to compute."""
        found: list[Block] = []
        if not self.max_blocks:
            return found
        for key, parent, block in self._chain(tokens[: len(tokens) - 2], adapter):
            hit = self.blocks.get(key)
            if hit is None or hit.parent != parent or hit.tokens != block:
                break
            self.blocks.move_to_end(key)
            found.append(hit)
        self.hits += BLOCK * len(found)
        self.misses += len(tokens) - BLOCK * len(found)
        return found

    def store(self, tokens: list[int], adapter: int, cache: list[np.ndarray], row: int) -> None:
        """Keep the full blocks of a prefilled prompt (row `row` of the cache buffers) not kept yet."""
        if not self.max_blocks:
            return
        for i, (key, parent, block) in enumerate(self._chain(tokens, adapter)):
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            span = slice(i * BLOCK, (i + 1) * BLOCK)
            self.blocks[key] = Block(adapter, parent, block, [buffer[row, :, span].copy() for buffer in cache])
            while len(self.blocks) > self.max_blocks:
                self.blocks.popitem(last=False)

    @staticmethod
    def restore(blocks: list[Block], cache: list[np.ndarray], row: int) -> int:
        """Write the blocks into row `row` of the cache buffers; the positions they fill."""
        for i, block in enumerate(blocks):
            span = slice(i * BLOCK, (i + 1) * BLOCK)
            for buffer, part in zip(cache, block.kv):
                buffer[row, :, span] = part
        return BLOCK * len(blocks)

    def forget(self, adapter: int) -> None:
        """Drop an adapter's blocks (it was unloaded; its id is not used again)."""
        for key in [key for key, block in self.blocks.items() if block.adapter == adapter]:
            del self.blocks[key]
