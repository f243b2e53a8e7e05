"""Building blocks on top of the shared scan operator (no model-family logic here).

- :class:`SSMCore`: per-route x_proj / dt_proj / A_logs / Ds / dt_bias + one ``selective_scan`` call.
- :class:`SS2D`: VMamba's 2D mixer (in_proj, depthwise conv, SSMCore over routes, norm, out_proj).
- :class:`VSSBlock`: pre-norm residual block (mixer + optional MLP, DropPath).
- :class:`ConvStem`, :class:`PatchEmbed`: image -> (B, H/4, W/4, C) channels-last tokens.
- :class:`ConvDownsample`, :class:`PatchMerging`: stage transitions (H, W halved).
- :class:`Mlp`, :class:`LayerNorm2d`, :class:`ChannelAttention` (LocalMamba's SCAttn).
- :class:`SimplePyramid`: one stride-16 map per level -> strides 4, 8, 16, 32 (Vim's dense backbone).

All maps are channels-last (B, H, W, C) unless a name says otherwise (``LayerNorm2d``).
"""

from .block import VSSBlock
from .channel_attn import ChannelAttention
from .downsample import ConvDownsample, PatchMerging
from .mlp import Mlp
from .norm import LayerNorm2d, LayerNormNHWC
from .pyramid import SimplePyramid
from .ss2d import SS2D
from .ssm import SSMCore, A_log_init_, auto_dt_rank, dt_bias_init_
from .stem import ConvStem, PatchEmbed

__all__ = [
    "SSMCore",
    "SS2D",
    "VSSBlock",
    "ConvStem",
    "PatchEmbed",
    "ConvDownsample",
    "PatchMerging",
    "Mlp",
    "LayerNorm2d",
    "LayerNormNHWC",
    "ChannelAttention",
    "SimplePyramid",
    "auto_dt_rank",
    "dt_bias_init_",
    "A_log_init_",
]
