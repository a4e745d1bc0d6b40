"""KV-cache helpers shared by cited generation (:mod:`.constrained`) and SelfCite scoring (:mod:`.selfcite`)."""

from __future__ import annotations


def plain_dynamic(cache) -> bool:
    """Is ``cache`` a plain :class:`~transformers.DynamicCache` (every layer a filled ``DynamicLayer``)?

    Only such caches can be sliced into prefixes; others (e.g. sliding-window layers) cannot.
    """
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and getattr(layer, "is_initialized", False) for layer in layers)


def prefix_cache(cache, length: int, batch: int = 1, config=None):
    """A new cache holding the first ``length`` positions of ``cache`` repeated ``batch`` times
    (``cache`` is left untouched); ``None`` when the cache type does not allow it."""
    from transformers import DynamicCache

    if cache is None or length <= 0 or not plain_dynamic(cache):
        return None
    data = []
    for layer in cache.layers:
        k, v = layer.keys[:, :, :length], layer.values[:, :, :length]
        if batch > 1:
            k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        data.append((k, v))
    return DynamicCache(ddp_cache_data=data)
