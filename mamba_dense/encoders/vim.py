"""Vim (Vision Mamba) and Mamba(R) (Vim with register tokens): plain encoders with a dense pyramid.

Papers and code read for the configuration (not copied):
- Vim: Zhu et al. 2024, "Vision Mamba: Efficient Visual Representation Learning with Bidirectional
  State Space Model" (hustvl/Vim, ``vim/models_mamba.py``, ``mamba-1p1p1/.../mamba_simple.py``,
  ``seg/backbone/vim.py``).
- Mamba(R): Wang et al. 2024, "Mamba(R): Vision Mamba ALSO Needs Registers"
  (wangf3014/Mamba-Reg, ``models_mamba.py``, ``mamba_custom.py``, ``utils.get_cls_idx``).

Both are a patch-16 stem, absolute position embeddings and 24 pre-norm blocks
``x + mixer(RMSNorm(x))`` whose mixer is a bidirectional Mamba-1 (``bimamba_type="v2"``: the
backward scan has its own conv, x_proj, dt_proj, A and D; in_proj/out_proj are shared and the two
outputs are averaged). Here the mixer is :class:`~mamba_dense.layers.seq_mixer.RouteMamba` with
K = 2 routes through the tokens, run by ONE call of the shared scan operator.

Token layout and routes. The token tensor is ``[image tokens (raster, M), cls (Vim only),
registers (Mamba(R) only, R)]``; tokens are never physically reordered. The scan order is a route:
Vim's middle class token is visited at step M // 2 of the forward route; registers are spliced in
by ``routes.with_registers`` where Mamba(R) puts them (register r after the first (r + 1) * (S // (R + 1))
of the S other tokens); the backward route is the forward
one reversed, so registers are met in mirrored positions, as in Mamba(R) where the backward scan
is the flipped sequence. Mamba(R) "recycles" its registers at the end: the classifier reads the
12 register outputs (each projected C -> C / register_reduce, concatenated, normalised); dense
features drop them (``forward_intermediates(..., return_registers=True)`` hands them out).

Dense prediction (``simple_pyramid=True``, the default of ``timm.create_model(name,
features_only=True)`` and so of smp's ``tu-<name>``): the outputs of blocks 5, 11, 17, 23 (depth
24; ``pyramid_blocks``) become maps (B, C, ceil(H/16), ceil(W/16)) and go through Vim's simple
pyramid (:class:`~mamba_dense.layers.SimplePyramid`: 4x deconv, 2x deconv, identity, 2x max-pool)
to strides 4, 8, 16, 32; ``feature_info`` then lists those four levels. Without the pyramid
``feature_info`` has one stride-16 entry per block (timm's ViT convention) and ``features_only``
takes the same 4 blocks. Any input size works: the image is zero-padded at the bottom/right to a
multiple of 16, the position embedding (learned for the 14 x 14 grid of 224 px) is resampled
bicubically to the actual grid, and the level at stride s is cropped to ceil(H/s) x ceil(W/s).

Deviations from the official code (see also the ``NOTE`` comments):
- Position embeddings are stored split: ``pos_embed`` (image grid), ``cls_pos_embed`` (Vim's
  middle token), ``reg_pos_embed`` (Mamba(R)); :func:`checkpoint_filter_fn` converts official
  checkpoints.
- Stochastic depth is the usual per-block ``x + drop_path(mixer(norm(x)))``; Vim applies block
  i's drop path inside block i + 1 (same rates, shifted by one) and one more before the final norm.
- The residual stream is kept in the activation dtype (Vim: ``residual_in_fp32=True``).
- Training from scratch: every route's dt bias gets Mamba's init (softplus(bias) log-uniform in
  [1e-3, 0.1]). In the official code only the forward ``dt_proj`` gets it; ``dt_proj_b`` is zeroed by
  ``_init_weights`` (softplus 0.693), which looks accidental. Official checkpoints load either way.
- Weight decay: the per-route biases (``conv1d_bias``, ``ssm.dt_projs_bias``, stacked (K, E)) are kept out
  of it, as the official 1-D biases are under timm's rule; the tasks also keep ``A_log`` and ``D`` out
  (Mamba's intent; Vim's timm optimizer decays them).
- Dense features are block outputs (the residual stream). Vim's segmentation backbone returns the
  mixer output of the tapped block (``hidden_states`` of its fused add-norm blocks, without the
  residual), runs without the class token (``cls_token=False`` reproduces that) and uses
  SyncBatchNorm in the pyramid (``nn.BatchNorm2d`` here; convert to SyncBN in DDP as usual).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, PatchEmbed, lecun_normal_, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._registry import generate_default_cfgs
from torch.utils.checkpoint import checkpoint

from mamba_dense.kernels import routes as _routes
from mamba_dense.layers.pyramid import SimplePyramid
from mamba_dense.layers.seq_mixer import RouteMamba

from ._builder import forget_loaded_state, pretrained_filter
from ._features import check_image_batch
from ._registry import register_encoder

__all__ = ["Vim", "VimBlock", "vim_route", "checkpoint_filter_fn"]


# ---------------------------------------------------------------------------------------------
# blocks


class VimBlock(nn.Module):
    """Pre-norm residual block ``x + DropPath(RouteMamba(norm(x), route))``.

    Args:
        dim: width C. d_state, d_conv, expand, dt_rank: the Mamba mixer's settings.
        drop_path: stochastic depth rate. norm_eps: norm epsilon. rms_norm: RMSNorm (Vim) or LayerNorm.

    Shapes: (B, L, C), route (2, S) -> (B, L, C).
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
        rms_norm: bool = True,
    ) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=norm_eps) if rms_norm else nn.LayerNorm(dim, eps=norm_eps)
        self.mixer = RouteMamba(
            dim, num_routes=2, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, divide_out=True
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, route: torch.Tensor, inv: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.drop_path(self.mixer(self.norm(x), route, inv))


@_routes.cached_route(maxsize=128)
@_routes._on_cpu  # built on the CPU under a meta (or CUDA) default device too
def vim_route(num_patches: int, cls_token: bool = True, num_registers: int = 0) -> torch.Tensor:
    """Vim / Mamba(R) scan routes over the token layout ``[patches (M), cls?, registers (R)]``.

    Row 0 is the forward order: patches in raster order, the class token (token M) at step M // 2,
    registers spliced in by ``routes.with_registers(placement="mambar")``, the positions of the official
    Mamba(R) (``get_cls_idx``). Row 1 is row 0 reversed. With neither
    class token nor registers this is ``routes.bidirectional(M)``.

    Returns:
        int64 (2, M + cls + R) on the CPU (cached: the same tensor object for the same arguments while
        it is not edited in place, see ``routes.cached_route``).

    Example:
        >>> vim_route(4, cls_token=True).tolist()
        [[0, 1, 4, 2, 3], [3, 2, 4, 1, 0]]
    """
    if not cls_token and num_registers == 0:
        return _routes.bidirectional(num_patches)
    seq = _routes.raster(num_patches)
    if cls_token:
        half = num_patches // 2
        seq = torch.cat([seq[:half], torch.tensor([num_patches]), seq[half:]])
    seq = _routes.with_registers(seq, num_patches + int(cls_token), num_registers, placement="mambar")
    return _routes.stack(seq, _routes.flip(seq))


def _vim_inverse(num_patches: int, cls_token: bool, num_registers: int) -> torch.Tensor:
    """``routes.inverse`` of :func:`vim_route` over its M + cls + R tokens."""
    return _routes.inverse(vim_route(num_patches, cls_token, num_registers),
                           num_patches + int(cls_token) + num_registers)


@functools.lru_cache(maxsize=None)
def _route_keys(cls_token: bool, num_registers: int) -> tuple[str, str]:
    """``routes.device_route`` keys of the routes and their inverses for one token layout."""
    kw = dict(cls_token=cls_token, num_registers=num_registers)
    return (_routes.source_key(functools.partial(vim_route, **kw)),
            _routes.source_key(functools.partial(_vim_inverse, **kw)))


def _even_blocks(depth: int, n: int = 4) -> tuple[int, ...]:
    """n evenly spaced block indices ending at the last block: (5, 11, 17, 23) for depth 24.

    With fewer than n blocks a block repeats (depth 2 -> (0, 0, 1, 1)), so the pyramid always has
    its four inputs.
    """
    return tuple(max(0, -(-depth * (i + 1) // n) - 1) for i in range(n))


# ---------------------------------------------------------------------------------------------
# model


class Vim(nn.Module):
    """Vision Mamba encoder (Vim, and Mamba(R) with ``num_registers``).

    Args:
        img_size: pretraining size; sets the stored position-embedding grid (img_size / patch_size).
        patch_size: 16.
        in_chans: image channels.
        num_classes: classifier outputs (0: no classifier).
        embed_dim: width C (Vim-T 192, Vim-S 384, Vim-B 768).
        depth: blocks (24).
        d_state, d_conv, expand, dt_rank: Mamba mixer settings (16, 4, 2, "auto" = ceil(C / 16)).
        cls_token: Vim's learnable class token, visited in the middle of the scan.
        num_registers: Mamba(R) register tokens (12 in Mamba(R)-T/S/B); 0 for Vim.
        register_reduce: Mamba(R) head: each register is projected C -> C / register_reduce before
            the registers are concatenated for the classifier (T 1, S 2, B 4).
        global_pool: "token" (class token), "registers" (Mamba(R)), "avg" or "" (default: from the
            tokens present).
        drop_rate: dropout after the position embedding and before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        norm_eps: norm epsilon (1e-5). rms_norm: RMSNorm (True, as released) or LayerNorm.
        simple_pyramid: dense mode: ``feature_info`` / ``forward_intermediates`` are the 4 pyramid
            levels at strides 4, 8, 16, 32 (:class:`~mamba_dense.layers.SimplePyramid`).
        pyramid_blocks: the blocks feeding the 4 levels (default 4 evenly spaced, (5, 11, 17, 23)).
        output_stride: None or 32 (timm / smp pass it; nothing dilates, so 8 or 16 raise).

    Returns:
        ``forward`` -> logits (B, num_classes); ``forward_features`` -> (B, L, C) normalised tokens;
        ``forward_intermediates`` -> maps (B, C, ceil(H/s), ceil(W/s)), s = 16 per block, or
        s = 4, 8, 16, 32 per pyramid level.

    Example:
        >>> m = Vim(embed_dim=32, depth=2, num_classes=0, num_registers=2)
        >>> [f.shape for f in m.forward_intermediates(torch.randn(1, 3, 40, 64), intermediates_only=True)]
        [torch.Size([1, 32, 3, 4]), torch.Size([1, 32, 3, 4])]
        >>> d = Vim(embed_dim=32, depth=2, num_classes=0, simple_pyramid=True)
        >>> [tuple(f.shape[2:]) for f in d.forward_intermediates(torch.randn(1, 3, 40, 64), intermediates_only=True)]
        [(10, 16), (5, 8), (3, 4), (2, 2)]
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        cls_token: bool = True,
        num_registers: int = 0,
        register_reduce: int = 1,
        global_pool: str | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        rms_norm: bool = True,
        simple_pyramid: bool = False,
        pyramid_blocks: Sequence[int] | None = None,
        output_stride: int | None = None,
    ) -> None:
        super().__init__()
        if output_stride not in (None, 32):
            raise ValueError(
                f"{type(self).__name__} supports output_stride=32 only (got {output_stride}): its pyramid's deepest "
                "map is at stride 32 and nothing dilates. Fix: a decoder without output_stride (smp's Unet, FPN, "
                "UPerNet, Segformer) or output_stride=32"
            )
        if num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {num_registers}")
        if embed_dim % register_reduce:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by register_reduce {register_reduce}")
        self.num_classes = num_classes
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.has_cls_token = cls_token
        self.num_registers = num_registers
        # plain strings (constants under torch.compile): the routes and inverses are cached device
        # tensors looked up by key, so the blocks trace without a graph break
        self._route_keys = _route_keys(bool(cls_token), int(num_registers))
        self.register_reduce = register_reduce
        self.patch_size = patch_size
        self.grad_checkpointing = False
        if global_pool is None:
            global_pool = "registers" if num_registers else ("token" if cls_token else "avg")
        self._check_pool(global_pool)
        self.global_pool = global_pool

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
        )
        self.pos_grid = tuple(self.patch_embed.grid_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        self.reg_pos_embed = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # python floats: meta-safe
        self.blocks = nn.ModuleList(
            VimBlock(embed_dim, d_state, d_conv, expand, dt_rank, dpr[i], norm_eps, rms_norm) for i in range(depth)
        )
        self.norm = nn.RMSNorm(embed_dim, eps=norm_eps) if rms_norm else nn.LayerNorm(embed_dim, eps=norm_eps)
        blocks = pyramid_blocks if pyramid_blocks is not None else _even_blocks(depth)
        self.pyramid_blocks = tuple(int(b) for b in blocks)
        if any(not 0 <= b < depth for b in self.pyramid_blocks):
            raise ValueError(f"pyramid_blocks {self.pyramid_blocks} must index the {depth} blocks")
        if simple_pyramid:
            if len(self.pyramid_blocks) != 4:
                raise ValueError(
                    f"the pyramid has 4 levels; pyramid_blocks must list 4 blocks, got {self.pyramid_blocks}"
                )
            self.pyramid = SimplePyramid(embed_dim, patch_size, strides=(4, 8, 16, 32))
            self.feature_info = [
                dict(num_chs=embed_dim, reduction=r, module=f"pyramid.levels.{i}")
                for i, r in enumerate(self.pyramid.strides)
            ]
            self.default_out_indices: tuple[int, ...] = (0, 1, 2, 3)
        else:
            self.pyramid = None
            self.feature_info = [
                dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)
            ]
            self.default_out_indices = tuple(dict.fromkeys(self.pyramid_blocks))  # repeats dropped

        # Mamba(R) head: per-register projection, concat, norm.
        reg_dim = embed_dim // register_reduce
        if num_registers and register_reduce > 1:
            self.neck = nn.Linear(embed_dim, reg_dim, bias=False)
            norm_cls = nn.RMSNorm if rms_norm else nn.LayerNorm
            self.norm_neck = norm_cls(num_registers * reg_dim, eps=norm_eps)
        else:
            self.neck = self.norm_neck = None
        self.head_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.head = nn.Linear(self._pooled_dim(), num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # -- init / housekeeping --------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """Vim's init: lecun-normal patch conv, trunc-normal(.02) tokens and head, zero Linear biases,
        out_proj kaiming-uniform / sqrt(depth) (GPT-2 style rescale); SSM params as in Mamba."""
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for p in (self.pos_embed, self.cls_token, self.cls_pos_embed, self.reg_token, self.reg_pos_embed):
            if p is not None:
                trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            w = blk.mixer.out_proj.weight
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            w.div_(math.sqrt(len(self.blocks)))
        for m in (self.neck, self.head):
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Tokens, position embeddings and the SSMs' A_logs / Ds (flagged ``_no_weight_decay``)."""
        names = {"pos_embed", "cls_token", "cls_pos_embed", "reg_token", "reg_pos_embed"}
        return names | {n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^cls_token|^cls_pos_embed|^reg_token|^reg_pos_embed|^pos_embed|^patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm|^pyramid", (99999,))],
        )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def _check_pool(self, pool: str) -> None:
        ok = {"", "avg"}
        ok |= {"token"} if self.has_cls_token else set()
        ok |= {"registers"} if self.num_registers else set()
        if pool not in ok:
            raise ValueError(f"global_pool={pool!r} is not available for this model; choose one of {sorted(ok)}")

    def _pooled_dim(self) -> int:
        if self.global_pool == "registers":
            return self.num_registers * (self.embed_dim // self.register_reduce)
        return self.embed_dim

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        self.head = nn.Linear(self._pooled_dim(), num_classes) if num_classes > 0 else nn.Identity()

    # -- tokens ---------------------------------------------------------------------------------

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image -> token tensor (B, M + cls + R, C) with position embeddings, and the grid (gh, gw)."""
        check_image_batch(x, self.patch_embed.proj.in_channels)
        x = self.patch_embed(x)  # (B, gh, gw, C); zero-padded to a multiple of the patch size
        B, gh, gw, C = x.shape
        pos = self.pos_embed
        if (gh, gw) != self.pos_grid:
            pos = resample_abs_pos_embed(pos, new_size=(gh, gw), old_size=self.pos_grid, num_prefix_tokens=0)
        tokens = [x.reshape(B, gh * gw, C) + pos]
        if self.cls_token is not None:
            tokens.append((self.cls_token + self.cls_pos_embed).expand(B, -1, -1))
        if self.reg_token is not None:
            tokens.append((self.reg_token + self.reg_pos_embed).expand(B, -1, -1))
        x = torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]
        return self.pos_drop(x), (gh, gw)

    def route_for(self, num_patches: int) -> torch.Tensor:
        """The (2, S) scan routes for a grid of ``num_patches`` patches (CPU, cached)."""
        return vim_route(num_patches, self.has_cls_token, self.num_registers)

    def _run_block(self, blk: nn.Module, x: torch.Tensor, route: torch.Tensor,
                   inv: torch.Tensor | None = None) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, x, route, inv, use_reentrant=False)
        return blk(x, route, inv)

    # -- features -------------------------------------------------------------------------------

    def _run_blocks(
        self, x: torch.Tensor, taps: set[int], norm: bool, last: int | None = None
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor, tuple[int, int]]:
        """Embed and run blocks 0..last; returns {block: (B, L, C) tokens after it}, the last
        tokens and the patch grid. ``norm`` applies the final norm to the tapped tokens."""
        x, grid = self._embed(x)
        route, inv = (_routes.device_route(key, grid[0] * grid[1], device=x.device) for key in self._route_keys)
        last = len(self.blocks) - 1 if last is None else last
        taken = {}
        for i, blk in enumerate(self.blocks[: last + 1]):
            x = self._run_block(blk, x, route, inv)
            if i in taps:
                taken[i] = self.norm(x) if norm else x
        return taken, x, grid

    def _split(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, C) tokens -> patch map (B, C, gh, gw) and registers (B, R, C) (cls token dropped)."""
        B, L, C = tokens.shape
        M = grid[0] * grid[1]
        fmap = tokens[:, :M].reshape(B, grid[0], grid[1], C).permute(0, 3, 1, 2).contiguous()
        return fmap, tokens[:, L - self.num_registers :]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_registers: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]]:
        """Features as maps (timm contract): block outputs, or pyramid levels with ``simple_pyramid``.

        Args:
            x: (B, in_chans, H, W), any H, W (zero-padded to a multiple of 16 at the bottom/right).
            indices: entries of ``feature_info`` to take (blocks, or pyramid levels): None = all,
                int n = last n, sequence = those.
            norm: apply the final norm to each tapped block output (before the pyramid).
            stop_early: with ``intermediates_only``, skip the blocks after the last tapped one.
            output_fmt: "NCHW", "NHWC", or (blocks only) "NLC" -> (B, gh * gw, C) patch tokens.
            intermediates_only: return only the list of features.
            return_registers: each feature becomes a tuple (map, registers (B, R, C)): the register
                tokens of the tapped block (R = 0 gives (B, 0, C)); timm's ``return_prefix_tokens``.

        Returns:
            features, or (final normalised tokens (B, L, C), features). Block maps are
            (B, C, ceil(H/16), ceil(W/16)); pyramid level i is (B, C, ceil(H/s_i), ceil(W/s_i)).
        """
        fmt = str(getattr(output_fmt, "value", output_fmt))
        ok = ("NCHW", "NHWC") if self.pyramid is not None else ("NCHW", "NHWC", "NLC")
        if fmt not in ok:
            raise ValueError(f"output_fmt must be one of {ok}, got {output_fmt!r}")
        take_indices, _ = feature_take_indices(len(self.feature_info), indices)
        blocks = [self.pyramid_blocks[i] for i in take_indices] if self.pyramid is not None else take_indices
        if max(blocks) >= len(self.blocks):
            raise ValueError(
                f"features {take_indices} need block {max(blocks)} but only {len(self.blocks)} remain (pruned)"
            )
        last = max(blocks) if (stop_early and intermediates_only) else None
        image_size = (x.shape[-2], x.shape[-1])
        taken, final, grid = self._run_blocks(x, set(blocks), norm, last)
        feats: list[Any] = []
        for i, b in zip(take_indices, blocks):
            fmap, regs = self._split(taken[b], grid)
            if self.pyramid is not None:
                fmap = self.pyramid.forward_level(i, fmap, image_size)
            if fmt == "NHWC":
                fmap = fmap.permute(0, 2, 3, 1)
            elif fmt == "NLC":
                fmap = fmap.flatten(2).transpose(1, 2)
            feats.append((fmap, regs) if return_registers else fmap)
        if intermediates_only:
            return feats
        return self.norm(final), feats

    def forward_block_maps(
        self, x: torch.Tensor, indices: int | list[int] | tuple[int, ...] | None = None, norm: bool = False
    ) -> list[torch.Tensor]:
        """Block outputs as stride-16 maps (B, C, ceil(H/16), ceil(W/16)), with or without the pyramid.

        ``indices`` index blocks (None = all, int n = last n). Used e.g. by
        :func:`mamba_dense.encoders.feature_norm_map` to measure token norms of the plain model.
        """
        take, _ = feature_take_indices(len(self.blocks), indices)
        taken, _, grid = self._run_blocks(x, set(take), norm, max(take))
        return [self._split(taken[b], grid)[0] for b in take]

    def prune_intermediate_layers(
        self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last one a requested feature needs (and the norm / classifier)."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last = max(self.pyramid_blocks[i] for i in take_indices) if self.pyramid is not None else max_index
        self.blocks = self.blocks[: last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.neck = self.norm_neck = None
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> normalised tokens (B, M + cls + R, C)."""
        return self.norm(self._run_blocks(x, set(), False)[1])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        R = self.num_registers
        if self.global_pool == "registers":
            x = x[:, x.shape[1] - R :]  # (B, R, C), register order
            if self.neck is not None:
                x = self.neck(x)
            x = x.flatten(1)
            if self.norm_neck is not None:
                x = self.norm_neck(x)
        elif self.global_pool == "token":
            x = x[:, x.shape[1] - R - 1]
        elif self.global_pool == "avg":
            x = x[:, : x.shape[1] - R - int(self.has_cls_token)].mean(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# checkpoint filter


_DIRECTIONS = ("", "_b")  # official suffix of route 0 (forward) and route 1 (backward)


def checkpoint_filter_fn(
    state_dict: dict[str, torch.Tensor], model: Vim, fill_missing: bool = True
) -> dict[str, torch.Tensor]:
    """Official Vim / Mamba(R) checkpoint -> this model's state dict.

    Stacks the per-direction mixer tensors (``conv1d``/``conv1d_b``, ``x_proj``/``x_proj_b``,
    ``dt_proj``/``dt_proj_b``, ``A_log``/``A_b_log``, ``D``/``D_b``) into the route-indexed
    parameters, renames ``layers.i`` -> ``blocks.i`` and ``norm_f`` -> ``norm``, splits Vim's
    position embedding (the class token's entry sits in the middle, at index M // 2), maps
    Mamba(R)'s ``cls_token``/``pos_embed_cls`` (its registers) to ``reg_token``/``reg_pos_embed``
    and the segmentation backbone's ``fpn1..fpn4`` to ``pyramid.levels.0..3``. The image position
    embedding is resampled to the model's grid when they differ. Wrappers (``model``,
    ``state_dict``) and ``backbone.`` prefixes (mmseg checkpoints, decoder left out) are removed.

    Args:
        fill_missing: for timm's strict loading, leave out a class token the model does not have
            and copy the model's own tensors for what the checkpoint lacks (a class token or
            registers, the pyramid of a classification checkpoint). ``mamba_dense.convert`` passes
            False: such tensors then surface as unexpected / missing keys and are reported.
    """
    from ._builder import unwrap_checkpoint

    sd, _ = unwrap_checkpoint(state_dict)
    if any(k.startswith("blocks.") for k in sd):  # already ours
        return sd
    out: dict[str, torch.Tensor] = {}
    mixer: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            if rest.startswith("mixer."):
                mixer.setdefault(int(i), {})[rest[len("mixer.") :]] = v
            else:
                out[f"blocks.{i}.{rest}"] = v
        elif k.startswith("norm_f."):
            out["norm." + k[len("norm_f.") :]] = v
        elif k[:3] == "fpn" and k[3:4].isdigit():
            out[f"pyramid.levels.{int(k[3]) - 1}.{k[5:]}"] = v
        elif k in ("pos_embed", "cls_token", "pos_embed_cls"):
            continue  # below
        else:
            out[k] = v
    for i, m in mixer.items():
        p = f"blocks.{i}.mixer."
        out[p + "in_proj.weight"] = m.pop("in_proj.weight")
        out[p + "out_proj.weight"] = m.pop("out_proj.weight")
        for extra in ("in_proj.bias", "out_proj.bias"):
            if extra in m:
                out[p + extra] = m.pop(extra)
        out[p + "conv1d_weight"] = torch.stack([m.pop(f"conv1d{s}.weight")[:, 0] for s in _DIRECTIONS])
        if "conv1d.bias" in m:
            out[p + "conv1d_bias"] = torch.stack([m.pop(f"conv1d{s}.bias") for s in _DIRECTIONS])
        out[p + "ssm.x_proj_weight"] = torch.stack([m.pop(f"x_proj{s}.weight") for s in _DIRECTIONS])
        out[p + "ssm.dt_projs_weight"] = torch.stack([m.pop(f"dt_proj{s}.weight") for s in _DIRECTIONS])
        out[p + "ssm.dt_projs_bias"] = torch.stack([m.pop(f"dt_proj{s}.bias") for s in _DIRECTIONS])
        out[p + "ssm.A_logs"] = torch.stack([m.pop("A_log"), m.pop("A_b_log")])
        out[p + "ssm.Ds"] = torch.stack([m.pop("D"), m.pop("D_b")])
        out.update({p + k: v for k, v in m.items()})  # anything else: left for the strict check

    # tokens and position embeddings: Vim (middle cls, pos over M + 1), Mamba(R) (registers named
    # cls_token, pos_embed_cls), or a segmentation backbone (patches only)
    pos = sd["pos_embed"]
    extra: dict[str, torch.Tensor] = {}
    if "pos_embed_cls" in sd:
        extra = {"reg_token": sd["cls_token"], "reg_pos_embed": sd["pos_embed_cls"]}
    elif "cls_token" in sd:
        half = (pos.shape[1] - 1) // 2
        extra = {"cls_token": sd["cls_token"], "cls_pos_embed": pos[:, half : half + 1]}
        pos = torch.cat([pos[:, :half], pos[:, half + 1 :]], dim=1)
    own = model.state_dict()
    for k, v in extra.items():
        if k in own or not fill_missing:
            out[k] = v
    if fill_missing:  # what a classification / cls-less checkpoint lacks keeps the model's init
        for k, v in own.items():
            tokens = ("cls_token", "cls_pos_embed", "reg_token", "reg_pos_embed")
            if k not in out and (k.startswith("pyramid.") or k in tokens):
                out[k] = v
    old = math.isqrt(pos.shape[1])
    if old * old != pos.shape[1]:
        raise ValueError(f"pos_embed has {pos.shape[1]} patch entries, not a square grid; cannot resample it")
    if (old, old) != model.pos_grid:
        pos = resample_abs_pos_embed(pos, new_size=model.pos_grid, old_size=(old, old), num_prefix_tokens=0)
    out["pos_embed"] = pos
    return out


# ---------------------------------------------------------------------------------------------
# configs


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return dict(
        url="",
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=None,
        crop_pct=0.875,
        interpolation="bicubic",
        fixed_input_size=False,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.proj",
        classifier="head",
        **kwargs,
    )


_PAPER = dict(vim="arXiv:2401.09417 (hustvl/Vim)", reg="arXiv:2405.14858 (wangf3014/Mamba-Reg)")

default_cfgs = generate_default_cfgs(
    {
        "vim_tiny": _cfg(paper_ids=_PAPER["vim"]),
        "vim_small": _cfg(paper_ids=_PAPER["vim"]),
        "vim_tiny_reg": _cfg(paper_ids=_PAPER["reg"]),
        "vim_small_reg": _cfg(paper_ids=_PAPER["reg"]),
        "vim_base_reg": _cfg(paper_ids=_PAPER["reg"]),
        "mambar_tiny": _cfg(paper_ids=_PAPER["reg"]),
        "mambar_small": _cfg(paper_ids=_PAPER["reg"]),
        "mambar_base": _cfg(paper_ids=_PAPER["reg"]),
    }
)


def _create_vim(variant: str, pretrained: bool = False, **kwargs: Any) -> Vim:
    filter_fn = pretrained_filter(variant, pretrained, kwargs, checkpoint_filter_fn)  # a file, loaded strictly
    if kwargs.get("features_only"):
        # NOTE: features for dense heads = the simple pyramid (strides 4..32), as Vim's segmentation
        # backbone; simple_pyramid=False gives the plain stride-16 block features instead.
        kwargs.setdefault("simple_pyramid", True)
    if kwargs.get("simple_pyramid"):
        default_out = (0, 1, 2, 3)
    else:
        default_out = tuple(dict.fromkeys(kwargs.get("pyramid_blocks") or _even_blocks(kwargs.get("depth", 24))))
    out_indices = kwargs.pop("out_indices", default_out)
    return forget_loaded_state(build_model_with_cfg(
        Vim,
        variant,
        pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    ))


# Vim: middle class token, no registers. Mamba(R): 12 registers, no class token.
_VIM_T = dict(embed_dim=192, depth=24, cls_token=True)
_VIM_S = dict(embed_dim=384, depth=24, cls_token=True)
_REG_T = dict(embed_dim=192, depth=24, cls_token=False, num_registers=12, register_reduce=1)
_REG_S = dict(embed_dim=384, depth=24, cls_token=False, num_registers=12, register_reduce=2)
_REG_B = dict(embed_dim=768, depth=24, cls_token=False, num_registers=12, register_reduce=4)


@register_encoder
def vim_tiny(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-T: C 192, depth 24, middle class token (~7M params)."""
    return _create_vim("vim_tiny", pretrained, **dict(_VIM_T, **kwargs))


@register_encoder
def vim_small(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-S: C 384, depth 24, middle class token (~26M params)."""
    return _create_vim("vim_small", pretrained, **dict(_VIM_S, **kwargs))


@register_encoder
def vim_tiny_reg(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Mamba(R)-T: Vim-T with 12 registers and the register head (~9M params)."""
    return _create_vim("vim_tiny_reg", pretrained, **dict(_REG_T, **kwargs))


@register_encoder
def vim_small_reg(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Mamba(R)-S: Vim-S with 12 registers, register head reduced 384 -> 192 (~28M params)."""
    return _create_vim("vim_small_reg", pretrained, **dict(_REG_S, **kwargs))


@register_encoder
def vim_base_reg(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Mamba(R)-B: C 768, 12 registers, register head reduced 768 -> 192 (~99M params)."""
    return _create_vim("vim_base_reg", pretrained, **dict(_REG_B, **kwargs))


@register_encoder
def mambar_tiny(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Alias of :func:`vim_tiny_reg` under the paper's name."""
    return _create_vim("mambar_tiny", pretrained, **dict(_REG_T, **kwargs))


@register_encoder
def mambar_small(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Alias of :func:`vim_small_reg` under the paper's name."""
    return _create_vim("mambar_small", pretrained, **dict(_REG_S, **kwargs))


@register_encoder
def mambar_base(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Alias of :func:`vim_base_reg` under the paper's name."""
    return _create_vim("mambar_base", pretrained, **dict(_REG_B, **kwargs))
