"""llmprune: post-training compression for large language models.

Importing is cheap and does nothing: the heavy modules load on first use.
"""
__version__ = "0.1.0"

_LAZY = {
    "compress": ("llmprune.api", "compress"),
    "evaluate": ("llmprune.api", "evaluate"),
    "load": ("llmprune.api", "load"),
    "export": ("llmprune.export", "export"),
    "CompressConfig": ("llmprune.config", "CompressConfig"),
    "LLMPruneError": ("llmprune.errors", "LLMPruneError"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'llmprune' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
