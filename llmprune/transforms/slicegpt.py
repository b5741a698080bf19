"""SliceGPT: rotate the residual stream onto its principal components and delete the weakest ones
(Ashkboos et al. 2024, "SliceGPT: Compress Large Language Models by Deleting Rows and Columns",
arXiv:2401.15024). The result is a smaller dense model: every weight that reads or writes the residual
stream loses rows or columns, nothing is masked.

After `fuse_norms` the network is invariant to an orthogonal Q on the residual stream (sec. 3.2):
in the paper's x @ W notation the embedding and every linear that writes the stream are multiplied
by Q on the right, every linear that reads it by Q^T on the left (torch (out, in) weights: writers
W <- Q^T W, readers W <- W Q). Q holds the eigenvectors of the stream's covariance X^T X sorted by eigenvalue, so
keeping its first d columns keeps the d directions the calibration data uses most (sec. 3.3).

Two modes:
- "per-block" (the paper, sec. 3.4): each residual point gets its own Q (block input, MLP input),
  computed sequentially on the already-sliced model. A residual that crosses from basis Q_a to basis
  Q_b goes through a (d, d) shortcut Q_a^T Q_b, held by `SlicedDecoderLayer`.
- "shared": one Q for the whole stream, from the covariance summed over every point a norm reads it
  (each block's two norms and the final norm) in one dense pass. Each token vector is RMS-normalized
  first: a norm only reads directions, and without it the deepest blocks' larger residuals and a few
  outlier tokens would pick the basis for everyone. No shortcuts: the result is a standard
  checkpoint of the same class with hidden_size = d (config.head_dim set explicitly).

The LM head and the last residual stay at full width by default, as in the reference code
(microsoft/TransformerCompression, `do_slice_head` off): the last block's MLP writes all D rotated
components (its residual shortcut maps the d kept ones into D), the final norm and the head read
D (the head only rotated). A small model's vocabulary-sized head is where that costs parameters
(SmolLM2 at 25%: 49,152 x 144 = 7.1M), and slicing it (`slice_head=True`, `--slice-head`) costs
perplexity the reference does not pay. With "shared" rotation an unsliced head also needs that one
shortcut (a (D, d) identity embedding) in the last block, so the folder loads through `load_sliced`
(`llmprune.load`) rather than plain transformers; with `--slice-head` it stays a standard checkpoint.

Tied embeddings are untied, necessarily: the head reads diag(g_final) and the last
basis, the embedding writes the first one, so they stop being one tensor; the vocab-sized head then
counts against the savings of small models.

RMSNorm after slicing: a standard RMSNorm divides by sqrt(mean over d of x^2 + eps) while the dense
model divided by sqrt(mean over D of x^2 + eps). Multiplying every reading linear by sqrt(D/d) and
using eps' = eps * D / d makes the sliced norm compute exactly x / sqrt(||x||^2 / D + eps), i.e.
the reference code's RMSN(mean_dim=D), with a plain unit-weight RMSNorm that transformers can load.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import walker
from ..arch import get
from ..errors import LLMPruneError
from ..sliced import add_shortcuts, set_linear
from ..sliced import shortcut as _shortcut
from ..sliced import unit_norm as _unit_norm
from .fuse import Layout, fuse_norms, layout_of

CITE = "Ashkboos et al. 2024, SliceGPT, arXiv:2401.15024"
ROTATIONS = ("per-block", "shared")


def new_dim_for(hidden: int, slicing: float, round_to: int = 8, heads: int = 1) -> int:
    """The kept width: (1 - slicing) * hidden rounded DOWN to a multiple of round_to (as the reference
    code does), so the model is never larger than asked and the width stays kernel-friendly; and to
    a multiple of the attention head count, because transformers (5.x) refuses to save or load a
    config whose hidden_size is not one, even with head_dim given (SmolLM2's 9 heads and the
    default 8: multiples of 72)."""
    if not 0.0 < slicing < 1.0:
        raise LLMPruneError(f"--slicing must be in (0, 1), the fraction of the hidden size to delete; got {slicing}")
    if round_to < 1:
        raise LLMPruneError(f"--round-to must be a positive integer, got {round_to}")
    step = math.lcm(round_to, max(1, heads))
    d = math.floor((1.0 - slicing) * hidden + 1e-9) // step * step
    if d < 1:
        why = f"a multiple of {round_to}" if step == round_to else \
            f"a multiple of {step} (--round-to {round_to} and the {heads} attention heads)"
        raise LLMPruneError(f"slicing {slicing} of hidden size {hidden} rounded down to {why} leaves nothing; "
                            f"lower --slicing or --round-to")
    return d


class _Cov:
    """Accumulates X^T X over tokens in float64 (the paper's PCA is on the uncentered covariance)."""

    def __init__(self, dim: int, device, normalize: bool = False):
        self.xtx = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.n = 0
        self.normalize = normalize

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.xtx.device, torch.float64)  # (tokens, D)
        if self.normalize:  # every token counts once, whatever its norm: RMSNorm only reads directions
            x = x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        self.xtx.addmm_(x.T, x)
        self.n += x.shape[0]

    def pca(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (descending) and eigenvectors as columns of an orthogonal Q (D, D), float64."""
        evals, evecs = torch.linalg.eigh(self.xtx / max(self.n, 1))
        order = torch.argsort(evals, descending=True)
        return evals[order], evecs[:, order]


def _shared_cov(model, lay: Layout, ids: torch.Tensor, batch_size: int, dev: torch.device) -> _Cov:
    """Covariance of the residual stream at every point a norm reads it (each block's norms and the
    final norm), block by block on `dev` through the calibration engine (walker.walk): its rerun of
    each block fires the norms' hooks; the final norm reads the last block's outputs."""
    acc = _Cov(get(model, lay.norm).weight.shape[0], dev, normalize=True)
    hooks, block = [], None
    try:
        for block in walker.walk(model, ids, batch_size, device=dev, progress=False, desc="slicegpt covariance"):
            for h in hooks:  # the previous block has been rerun: its norms were read
                h.remove()
            hooks = [get(block.module, n).register_forward_pre_hook(lambda _m, args: acc.add(args[0]))
                     for n, _ in lay.reads]
    finally:
        for h in hooks:
            h.remove()
    for out in block.outputs:  # (b, s, D): what the final norm reads
        acc.add(out)
    return acc


ROWS = 8192  # rows of an embedding or head rotated at a time: 0.5 GiB of fp64 at hidden 8192


def _rotated_rows(w: torch.Tensor, q: torch.Tensor, scale: float = 1.0, fold: torch.Tensor | None = None) -> torch.Tensor:
    """w @ q * scale in fp64 on q's device, ROWS rows at a time (a 70B model's 128k-row embedding would
    be 8 GiB in fp64 at once), back on w's device in w's dtype: (rows, D) @ (D, d) -> (rows, d). `fold`:
    a norm's scale g (D,) folded in first, rounded to w's dtype as fuse_norms rounds it (W diag(g))."""
    out = torch.empty(w.shape[0], q.shape[1], dtype=w.dtype, device=w.device)
    for r in range(0, w.shape[0], ROWS):
        rows = w[r:r + ROWS].to(q.device)
        if fold is not None:
            rows = (rows.double() * fold.to(q.device).double()).to(w.dtype)
        out[r:r + ROWS] = (rows.double() @ q * scale).to(w.device, w.dtype)
    return out


def _read(lin: nn.Linear, q: torch.Tensor, scale: float) -> None:
    """A linear that reads the stream: W <- sqrt(D/d) W Q_d, (out, D) @ (D, d) -> (out, d)."""
    set_linear(lin, lin.weight.double() @ q * scale)


def _set_head(head: nn.Linear, q: torch.Tensor, scale: float) -> None:
    """_read for the vocabulary-sized head: its rows rotated a chunk at a time on q's device."""
    set_linear(head, _rotated_rows(head.weight, q, scale))


def _write(lin: nn.Linear, q: torch.Tensor) -> None:
    """A linear that writes the stream: W <- Q_d^T W, b <- b Q_d, (d, D) @ (D, in) -> (d, in)."""
    bias = None if lin.bias is None else lin.bias.double() @ q
    set_linear(lin, q.T @ lin.weight.double(), bias)


def check(model, ids: torch.Tensor, rotation: str) -> Layout:
    """The model's layout, or an LLMPruneError: already sliced, an unknown rotation, token ids of the wrong
    shape or too few for a full-rank covariance. Needs only the config and shapes (a model on the meta device)."""
    lay = layout_of(model)
    if getattr(model.config, "slicegpt", None):
        raise LLMPruneError("this model is already sliced (per-block, or with a full-width head); slice the dense "
                            "model once with the total --slicing")
    if rotation not in ROTATIONS:
        raise LLMPruneError(f"--rotation must be one of {', '.join(ROTATIONS)}, got {rotation!r}")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        raise LLMPruneError("SliceGPT calibration must be token ids of shape (samples, seqlen)")
    hidden = get(model, lay.embed).weight.shape[1]
    if ids.numel() < hidden:
        raise LLMPruneError(f"SliceGPT needs at least {hidden} calibration tokens (the hidden size) for a "
                            f"full-rank covariance, got {ids.numel()}; raise --nsamples or --seqlen "
                            f"(the paper uses 1024 x 2048)")
    return lay


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def configure(cfg, n_blocks: int, hidden: int, new_dim: int, rotation: str, head_width: int, head_dim: int) -> dict:
    """Make `cfg` the sliced model's config, in place; returns the manifest `rebuild_per_block` needs
    (saved in the config as `slicegpt` unless the result is a standard checkpoint: shared rotation and a
    sliced head)."""
    eps0 = cfg.rms_norm_eps
    manifest = {"method": "slicegpt", "rotation": rotation, "hidden_size": hidden, "new_dim": new_dim,
                "shortcuts": list(range(n_blocks)) if rotation == "per-block" else []}
    if head_width != new_dim:
        manifest.update(head_width=head_width, norm_eps=eps0)
        if rotation == "shared":
            manifest["mlp_shortcuts"] = [n_blocks - 1]
    cfg.head_dim = head_dim  # hidden_size / num_heads no longer gives it
    cfg.hidden_size = new_dim
    cfg.rms_norm_eps = eps0 * hidden / new_dim
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    text.tie_word_embeddings = cfg.tie_word_embeddings = False  # see the module docstring: untied
    if not (rotation == "shared" and head_width == new_dim):
        cfg.slicegpt = manifest  # saved in config.json so `load_sliced` needs only the folder
    return manifest


def slice_model(model, calib_input_ids: torch.Tensor, slicing: float, rotation: str = "per-block",
                round_to: int = 8, batch_size: int = 8, progress: bool = True, slice_head: bool = False,
                device=None) -> dict:
    """Fuse norms, rotate by PCA and slice the hidden size to (1 - slicing) * hidden (rounded down to
    a multiple of round_to and of the head count: new_dim_for), in place. Returns an info dict for the manifest; its "manifest" entry is
    what `rebuild_per_block` needs to rebuild a saved per-block model. device: where the blocks, the
    covariances and the rotations compute, one block there at a time (default: where the model is);
    the model stays where it is. arXiv:2401.15024."""
    lay = check(model, calib_input_ids, rotation)
    hidden = get(model, lay.embed).weight.shape[1]
    d = new_dim_for(hidden, slicing, round_to, getattr(model.config, "num_attention_heads", 1))
    info = rotate_and_slice(model, calib_input_ids, d, rotation, batch_size, progress, slice_head, device)
    info.update(slicing=slicing, round_to=round_to, slicing_actual=1 - d / hidden)
    return info


class InMemory:
    """Where the passes below find the model's parts when it is in memory, its norms fused beforehand:
    each block moves to `dev` while it is rotated and back after it (onload's SlicedOutput reads them
    from disk instead, fuses their norms and writes them)."""

    def __init__(self, model, lay: Layout, dev: torch.device):
        self.model, self.lay, self.dev = model, lay, dev
        self.blocks = get(model, lay.blocks)
        self.dtype = get(model, lay.embed).weight.dtype
        self._home = None

    def catch(self, ids, batch_size: int):
        return walker.catch(self.model, ids, batch_size, device=self.dev)

    def covariance(self, ids, batch_size: int) -> _Cov:
        return _shared_cov(self.model, self.lay, ids, batch_size, self.dev)

    def block(self, i: int) -> nn.Module:
        self._home = next(self.blocks[i].parameters()).device
        return self.blocks[i].to(self.dev)

    def resumed(self) -> tuple[int, dict | None]:
        """Where the passes start (the first block to slice) and what the blocks before left them (see
        `_per_block`, `_shared`): a killed run's, when the access object goes on from its checkpoint."""
        return 0, None

    def done(self, i: int, block: nn.Module, state: dict) -> None:
        """Block i is sliced; `state`: what the blocks after it need (resumed's)."""
        block.to(self._home)

    def embedding(self, q: torch.Tensor) -> None:
        embed = get(self.model, self.lay.embed)
        embed.weight = nn.Parameter(_rotated_rows(embed.weight, q))  # (vocab, d)
        embed.embedding_dim = q.shape[1]

    def head(self, q: torch.Tensor, scale: float, eps: float) -> None:
        _set_head(get(self.model, self.lay.head), q, scale)
        _unit_norm(get(self.model, self.lay.norm), q.shape[1], eps)


@torch.no_grad()
def rotate_and_slice(model, calib_input_ids: torch.Tensor, new_dim: int, rotation: str = "per-block",
                     batch_size: int = 8, progress: bool = True, slice_head: bool = False, device=None) -> dict:
    """The transform itself for an explicit kept width new_dim (new_dim = hidden: rotation only); the
    head and the last residual keep the full width unless slice_head."""
    lay = check(model, calib_input_ids, rotation)
    embed, blocks = get(model, lay.embed), get(model, lay.blocks)
    hidden = embed.weight.shape[1]
    if not 1 <= new_dim <= hidden:
        raise LLMPruneError(f"new width must be in [1, {hidden}], got {new_dim}")
    params_before = _n_params(model)
    was_training = model.training
    model.eval()
    dev = torch.device(device) if device is not None else embed.weight.device
    ids = calib_input_ids.to(dev)
    fused = fuse_norms(model)
    head_width = new_dim if slice_head else hidden  # the last residual, the final norm and the head
    eps0 = model.config.rms_norm_eps
    head_dim = get(blocks[0], lay.attn).head_dim
    kept = slice_blocks(InMemory(model, lay, dev), lay, ids, hidden, new_dim, rotation, batch_size, progress,
                        head_width, eps0)
    manifest = configure(model.config, len(blocks), hidden, new_dim, rotation, head_width, head_dim)
    model.train(was_training)
    return info_of(rotation, hidden, new_dim, head_width, manifest, ids.numel(), fused["untied"], params_before,
                   _n_params(model), kept)


def info_of(rotation: str, hidden: int, new_dim: int, head_width: int, manifest: dict, tokens: int, untied: bool,
            params_before: int, params_after: int, kept: list[float]) -> dict:
    """The manifest's slicegpt section."""
    return {"method": "slicegpt", "cite": CITE, "rotation": rotation, "hidden_size": hidden,
            "new_dim": new_dim, "head_width": head_width, "slice_head": head_width == new_dim,
            "standard": rotation == "shared" and head_width == new_dim, "calib_tokens": tokens,
            "untied_head": untied, "params_before": params_before, "params_after": params_after,
            "kept_variance": kept, "manifest": manifest}


@torch.no_grad()  # (the from-disk caller too: a graph through every block would hold them all)
def slice_blocks(m, lay: Layout, ids, hidden: int, d: int, rotation: str, batch_size: int, progress: bool,
                 head_width: int, eps0: float) -> list[float]:
    """Rotate and slice the model that `m` gives access to (InMemory, or onload's SlicedOutput), its norms
    fused (or fused by `m` as each block is handed out); returns the kept variance at each basis."""
    eps = eps0 * hidden / d
    scale = math.sqrt(hidden / d)  # see the module docstring: RMSNorm over d instead of D
    start, state = m.resumed()  # (0, None), or where a killed run's checkpoint left the passes
    if start == len(m.blocks):  # a killed run's head was written too
        return state["kept"]
    run = _shared if rotation == "shared" else _per_block
    kept, q_head = run(m, lay, ids, d, scale, eps, batch_size, progress, head_width, start, state)
    # the head reads the last basis; at full width the final norm is the dense one (its eps, no rescaling)
    m.head(q_head, scale if head_width == d else 1.0, eps if head_width == d else eps0)
    return kept


def _kept(evals: torch.Tensor, d: int) -> float:
    return float(evals[:d].sum() / evals.sum().clamp_min(1e-30))


def _shared(m, lay: Layout, ids, d: int, scale: float, eps: float, batch_size: int, progress: bool,
            head_width: int, start: int, state: dict | None) -> tuple[list[float], torch.Tensor]:
    """One Q from every residual read point of a dense pass; no shortcuts needed, except that an
    unsliced head (head_width = D) makes the last block's MLP write all D components, its residual
    embedded into them by a (D, d) shortcut."""
    if state is None:  # (else a killed run's bases and kept variance: `InMemory.resumed`)
        evals, Q = m.covariance(ids, batch_size).pca()
        state = {"kept": [_kept(evals, d)], "q": Q[:, :d], "q_head": Q[:, :head_width]}  # (D, d), (D, head_width)
        m.embedding(state["q"])
    q, q_head = state["q"].to(m.dev), state["q_head"].to(m.dev)  # (a killed run's, read into CPU memory)
    last = len(m.blocks) - 1
    for i in range(start, len(m.blocks)):
        block = m.block(i)
        for norm, readers in lay.reads:
            _unit_norm(get(block, norm), d, eps)
            for r in readers:
                _read(get(block, r), q, scale)
        for w in lay.writes:
            _write(get(block, w), q_head if i == last and w == lay.writes[-1] else q)
        if i == last and head_width != d:  # weight (D, d) = [I; 0]
            add_shortcuts(block, lay, None, _shortcut(q_head.T @ q, next(block.parameters())))
        m.done(i, block, state)
    return state["kept"], q_head


def _per_block(m, lay: Layout, ids, d: int, scale: float, eps: float, batch_size: int, progress: bool,
               head_width: int, start: int, state: dict | None) -> tuple[list[float], torch.Tensor]:
    """Sequential per-block PCA (arXiv:2401.15024 sec. 3.4 and the reference rotate_and_slice_sequential):
    each Q is computed from signals of the model sliced so far, so later blocks see earlier slicing."""
    from tqdm.auto import tqdm

    dtype, n, dev = m.dtype, len(m.blocks), m.dev
    # the engine's catch pass: block 0's inputs per batch and every block's own call arguments
    xs, calls = m.catch(ids, batch_size)  # (b, s, D) each, on dev
    # where the signals wait between steps: on dev, or in CPU memory when they would take too much of a GPU
    # (a 70B model's 128 x 2048 calibration tokens: 4.3 GB in bf16 at each of the three points below)
    home = walker.activation_home(m.model, ids, dev)
    like = torch.empty(0, dtype=dtype, device=dev)  # the shortcuts are made where the block computes

    def each(f, signals):  # f on dev, a batch at a time, the results back home
        return [f(s.to(dev)).to(home) for s in signals]

    def rotated(signals, q):  # (b, s, D) @ (D, d) -> (b, s, d)
        return each(lambda s: s @ q.to(dtype), signals)

    def pca_of(signals):
        acc = _Cov(signals[0].shape[-1], dev)
        for s in signals:
            acc.add(s)
        return acc.pca()

    if state is None:  # (else a killed run's next block: its inputs, their basis, the kept variances so far)
        evals, Q = pca_of(xs)
        kept = [_kept(evals, d)]
        q_in = Q[:, :d]  # (D, d): the basis of block 0's input
        m.embedding(q_in)
        xs = rotated(xs, q_in)  # (b, s, d)
    else:
        xs, q_in, kept = [x.to(home) for x in state["xs"]], state["q"].to(dev), state["kept"]
    (n1, attn_readers), (n2, mlp_readers) = lay.reads
    w_attn, w_mlp = lay.writes
    for i in tqdm(range(start, n), desc="slicegpt", disable=not progress, initial=start, total=n):
        # Residual back to full width (shortcut Q_in^T) so the MLP-input signal can be measured.
        layer = add_shortcuts(m.block(i), lay, attn_shortcut=_shortcut(q_in, like))
        _unit_norm(get(layer, n1), d, eps)
        _unit_norm(get(layer, n2), d, eps)
        for r in attn_readers:
            _read(get(layer, r), q_in, scale)
        mids = [layer.attn_residual(x.to(dev), **kw).to(home) for x, (_, kw) in zip(xs, calls[i])]  # (b, s, D)
        evals, Q = pca_of(mids)
        kept.append(_kept(evals, d))
        q_mid = Q[:, :d]
        _write(get(layer, w_attn), q_mid)
        layer.attn_shortcut = _shortcut(q_mid.T @ q_in, like)  # weight (d, d) = (Q_in^T Q_mid)^T
        for r in mlp_readers:
            _read(get(layer, r), q_mid, scale)
        mids = rotated(mids, q_mid)  # (b, s, d)
        layer.mlp_shortcut = _shortcut(q_mid, like)
        outs = each(layer.mlp_residual, mids)  # (b, s, D)
        del mids
        evals, Q = pca_of(outs)
        width = head_width if i == n - 1 else d  # the last residual: as wide as the head reads
        kept.append(_kept(evals, width))
        q_out = Q[:, :width]
        _write(get(layer, w_mlp), q_out)
        layer.mlp_shortcut = _shortcut(q_out.T @ q_mid, like)  # (width, d) = (Q_mid^T Q_out)^T
        xs = rotated(outs, q_out)  # (b, s, width)
        del outs
        q_in = q_out
        m.done(i, layer, {"xs": xs, "q": q_in, "kept": kept})
        del layer
    return kept, q_in
