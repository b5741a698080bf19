"""What llama.cpp assumes of an architecture rather than reads from a GGUF: the GGUF writer (export/gguf.py) refuses
variants it would misread, and the GGUF reader (models.py) builds the model it would run."""
from __future__ import annotations

# llama.cpp scales Gemma's queries by 1/sqrt(head_dim), but by 1/sqrt(hidden / heads) for the 27B, which it knows by
# its number of layers (no GGUF key says so)
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62, "gemma3": 62}


def query_scale(cfg) -> int:
    """The query_pre_attn_scalar llama.cpp assumes for a Gemma-2/3 config."""
    wide = cfg.num_hidden_layers == GEMMA_27B_LAYERS[cfg.model_type]
    return cfg.hidden_size // cfg.num_attention_heads if wide else cfg.head_dim
