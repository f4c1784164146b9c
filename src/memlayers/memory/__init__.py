"""The product-key memory layer: search, value pool, layer and usage statistics."""

from memlayers.memory.config import MemoryConfig
from memlayers.memory.layer import MemoryLayer
from memlayers.memory.pool import MemoryPool
from memlayers.memory.product_keys import ProductKeySearch
from memlayers.memory.usage import UsageTracker

__all__ = ["MemoryConfig", "MemoryLayer", "MemoryPool", "ProductKeySearch", "UsageTracker"]
