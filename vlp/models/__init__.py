"""Model families: one LightningModule each, assembled from shared blocks and objectives."""

from vlp.models.albef import ALBEF, ALBEFOutput
from vlp.models.base import OptimConfig, VLPModule
from vlp.models.clip import CLIP
from vlp.models.flamingo import Flamingo, FlamingoOutput
from vlp.models.flava import FLAVA, FLAVAOutput
from vlp.models.meter import METER, METEROutput
from vlp.models.outputs import DualEncoderOutput, VLPOutput

__all__ = [
    "ALBEF",
    "ALBEFOutput",
    "CLIP",
    "DualEncoderOutput",
    "FLAVA",
    "FLAVAOutput",
    "Flamingo",
    "FlamingoOutput",
    "METER",
    "METEROutput",
    "OptimConfig",
    "VLPModule",
    "VLPOutput",
]
