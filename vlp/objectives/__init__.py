"""Training objectives: each returns ``{"<name>_loss": ..., metrics}`` and owns its head."""

from vlp.objectives.albef import ITM, MLM, MomentumITC
from vlp.objectives.base import Objective
from vlp.objectives.distributed import gather_no_grad, gather_with_grad, world_info
from vlp.objectives.itc import ITC

__all__ = ["ITC", "ITM", "MLM", "MomentumITC", "Objective", "gather_no_grad", "gather_with_grad", "world_info"]
