"""What llama.cpp assumes of an architecture rather than reads from a GGUF: the GGUF writer (export/gguf_arch.py) refuses
variants it would misread, and the GGUF reader (models.py) builds the model it would run."""
from __future__ import annotations

import math

import numpy as np

# llama.cpp scales Gemma's queries by 1/sqrt(head_dim), but by 1/sqrt(hidden / heads) for the 27B, which it knows by
# its number of layers (no GGUF key says so)
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62, "gemma3": 62}


def query_scale(cfg) -> int:
    """The query_pre_attn_scalar llama.cpp assumes for a Gemma-2/3 config."""
    wide = cfg.num_hidden_layers == GEMMA_27B_LAYERS[cfg.model_type]
    return cfg.hidden_size // cfg.num_attention_heads if wide else cfg.head_dim


def llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float, old: float) -> np.ndarray:
    """Llama 3.1's RoPE scaling (rope_type "llama3") as llama.cpp reads it: the `rope_freqs` tensor, the factor
    each rotary frequency is divided by (1 for short wavelengths, `factor` for long ones, HF's smooth
    interpolation between `old / high` and `old / low`)."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:  # between: inv_freq / factor -> inv_freq
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def llama3_parameters(freqs: np.ndarray, theta: float, head_dim: int) -> dict | None:
    """The rope_parameters whose factors are a GGUF's `rope_freqs` (None if none are): all ones, plain RoPE; else
    Llama 3's scaling: the factors fix `factor` and, through the interpolated wavelengths, the original context;
    low and high frequency factors 1 and 4, as every Llama 3.x release has them (the factors depend on old /
    (high - low) and low / (high - low) alone, so any other pair gives the same model)."""
    freqs = np.asarray(freqs, dtype=np.float64)
    factor, low, high = float(freqs.max()), 1.0, 4.0
    if freqs.shape != (head_dim // 2,):
        return None
    if (freqs == 1).all():
        return {"rope_type": "default", "rope_theta": theta}
    if factor <= 1:
        return None
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    mid = (freqs > 1) & (freqs < factor * (1 - 1e-6))
    if mid.any():  # smooth = (old / wavelen - low) / (high - low), read back from each interpolated factor
        smooth = (1 / freqs[mid] - 1 / factor) / (1 - 1 / factor)
        old = float(np.median((smooth * (high - low) + low) * wavelen[mid]))
    else:  # no wavelength between the two: any old with old / high above the last 1 and old below the first factor
        j = int(np.argmax(freqs > 1))
        old = math.sqrt(high * wavelen[j - 1] * wavelen[j]) if j > 0 else wavelen[0] / 2
    old = round(old) if abs(old - round(old)) < 1e-3 * old else float(old)
    params = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
              "high_freq_factor": high, "original_max_position_embeddings": old}
    if not np.allclose(llama3_factors(theta, head_dim, factor, low, high, old), freqs, rtol=1e-4, atol=0):
        return None
    return params


def longrope_attention_factor(rp: dict, max_positions: int) -> float:
    """The factor transformers' LongRoPE (rope_type "longrope": Phi-3 128k, Phi-3.5, Phi-4-mini) scales cos and sin
    by, which llama.cpp reads as `rope.scaling.attn_factor`: the config's `attention_factor`, else
    sqrt(1 + ln s / ln n) for the original context n and s its `factor` or, without one, the context's growth
    (1 when s <= 1). llama.cpp's converter writes the default alone; this is the model's own."""
    old = rp["original_max_position_embeddings"]
    if rp.get("attention_factor") is not None:
        return float(rp["attention_factor"])
    s = rp.get("factor") or max_positions / old
    return 1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(old))


def longrope_parameters(long: np.ndarray, short: np.ndarray, theta: float, rotary: float, old: int,
                        attention: float | None, max_positions: int) -> dict:
    """The rope_parameters of a GGUF's LongRoPE: its `rope_factors_long` / `rope_factors_short` tensors, the original
    context (`rope.scaling.original_context_length`) and `rope.scaling.attn_factor`, kept only where it is not the
    default transformers computes (longrope_attention_factor)."""
    params = {"rope_type": "longrope", "rope_theta": theta, "partial_rotary_factor": rotary,
              "original_max_position_embeddings": old,
              "long_factor": [float(x) for x in long], "short_factor": [float(x) for x in short]}
    if attention is not None and not math.isclose(attention, longrope_attention_factor(params, max_positions),
                                                  rel_tol=1e-6):
        params["attention_factor"] = float(attention)
    return params
