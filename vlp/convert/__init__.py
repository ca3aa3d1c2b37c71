"""Checkpoint converters: weights of other code bases → vlp models.

``vlp convert albef CKPT --out PATH [--config RECIPE]`` (see :mod:`vlp.convert.albef`).
"""

from vlp.convert.albef import (
    ConversionReport,
    albef_from_recipe,
    albef_recipe_from_state,
    albef_to_vlp,
    convert_albef,
    map_albef_keys,
    vlp_to_albef,
)
from vlp.utils.checkpoint import interpolate_pos_embed

__all__ = [
    "ConversionReport",
    "albef_from_recipe",
    "albef_recipe_from_state",
    "albef_to_vlp",
    "convert_albef",
    "interpolate_pos_embed",
    "map_albef_keys",
    "vlp_to_albef",
]
