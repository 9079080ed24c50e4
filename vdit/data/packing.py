"""Packing: clips of different durations and sizes share one fixed token budget per row.

A clip's latent [T', H', W', C] is cut into spacetime patches on the host, in the DiT's own
order (`vdit.models.patch.patchify`), with each patch's integer (t, h, w) coordinate for RoPE.
Grain's best-fit packer then fills rows of `budget` patch tokens (and `clips_per_row * S`
caption tokens) from a stream of clips. Every feature of one clip gets the same segment id
(1, 2, ... within a row; 0 is padding), so attention restricted to equal ids never crosses
clips: self-attention with the video ids, cross-attention with (video ids, caption ids).
Packing state is part of the Grain iterator's state, so a resumed run packs identically.
"""

from __future__ import annotations

import grain
import numpy as np
from einops import rearrange

from vdit.models.patch import grid_positions, token_grid


def clip_to_patches(latent: np.ndarray, patch: tuple[int, int, int]) -> dict:
    """latent [T', H', W', C] -> {"patches": [N, pt*ph*pw*C], "positions": int32 [N, 3]}."""
    pt, ph, pw = patch
    if any(s % p for s, p in zip(latent.shape[:3], patch, strict=True)):
        raise ValueError(f"latent {latent.shape[:3]} is not divisible by the patch {patch}")
    patches = rearrange(latent, "(t pt) (h ph) (w pw) c -> (t h w) (pt ph pw c)",
                        pt=pt, ph=ph, pw=pw)
    positions = grid_positions(token_grid(latent.shape, patch)).astype(np.int32)
    return {"patches": np.ascontiguousarray(patches), "positions": positions}


def pack(ds: grain.IterDataset, *, budget: int, caption_length: int, clips_per_row: int,
         rows: int, seed: int, embeddings: bool = False) -> grain.IterDataset:
    """Elements {"patches" [N, P], "positions" [N, 3], "tokens" int32 [S]} -> packed batches of
    `rows` rows: patches [rows, budget, P], positions int32 [rows, budget, 3], segment_ids
    int32 [rows, budget], tokens and text_segment_ids int32 [rows, clips_per_row * S]
    (segment 0 = padding; a clip's patches and caption share its id).

    Best fit keeps padding small: a clip goes to the fullest row that still has room, and a
    batch is emitted when a clip fits no row. With `embeddings`, elements also hold "text"
    [S, E] and "text_mask" [S], packed like the tokens: [rows, clips_per_row * S, E] and
    [rows, clips_per_row * S] (each caption keeps its S slots and its clip's segment id)."""
    if rows <= 0 or budget <= 0:
        raise ValueError(f"rows ({rows}) and budget ({budget}) must be > 0")
    lengths = {"patches": budget, "positions": budget, "tokens": clips_per_row * caption_length}
    if embeddings:
        lengths.update(text=lengths["tokens"], text_mask=lengths["tokens"])
    packed = grain.experimental.BestFitPackIterDataset(
        ds, length_struct=lengths, num_packing_bins=rows, seed=seed, shuffle_bins=False,
        max_sequences_per_bin=clips_per_row)
    # The packer fills `rows` bins at a time and emits them one row each: batch them again.
    return packed.batch(rows, drop_remainder=True).map(_rename)


def _rename(batch: dict) -> dict:
    """Keep what the model needs: Grain also emits per-key positions and repeats the ids."""
    out = {"patches": batch["patches"], "positions": batch["positions"],
           "segment_ids": batch["patches_segment_ids"], "tokens": batch["tokens"],
           "text_segment_ids": batch["tokens_segment_ids"]}
    if "text_mask" in batch:
        out.update(text=batch["text"], text_mask=batch["text_mask"])
    return out


def drop_oversized(budget: int):
    """A filter for clips longer than the budget: they can never be packed (counted upstream)."""
    return lambda ex: len(ex["patches"]) <= budget


def efficiency(batch: dict) -> float:
    """Real patch tokens over the budget of a packed batch (segment id 0 is padding)."""
    ids = np.asarray(batch["segment_ids"])
    return float((ids > 0).mean())


def segment_mask(segment_ids: np.ndarray) -> np.ndarray:
    """[B, L] ids -> bool [B, L, L]: token i may attend to token j (same clip, not padding)."""
    ids = np.asarray(segment_ids)
    return (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] > 0)
