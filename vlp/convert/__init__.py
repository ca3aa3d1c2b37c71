"""Checkpoint converters: weights of other code bases → vlp models.

``vlp convert albef CKPT --out PATH [--config RECIPE]`` (see :mod:`vlp.convert.albef`) and
``vlp convert meter CKPT --out PATH [--config RECIPE]`` (see :mod:`vlp.convert.meter`).
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
from vlp.convert.meter import (
    METERConversionReport,
    convert_meter,
    map_meter_keys,
    meter_from_recipe,
    meter_recipe_from_state,
    meter_to_vlp,
    read_meter_checkpoint,
    vlp_to_meter,
)
from vlp.utils.checkpoint import interpolate_pos_embed

__all__ = [
    "ConversionReport",
    "METERConversionReport",
    "albef_from_recipe",
    "albef_recipe_from_state",
    "albef_to_vlp",
    "convert_albef",
    "convert_meter",
    "interpolate_pos_embed",
    "map_albef_keys",
    "map_meter_keys",
    "meter_from_recipe",
    "meter_recipe_from_state",
    "meter_to_vlp",
    "read_meter_checkpoint",
    "vlp_to_albef",
    "vlp_to_meter",
]
