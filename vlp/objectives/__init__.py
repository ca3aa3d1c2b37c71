"""Training objectives: each returns ``{"<name>_loss": ..., metrics}`` and owns its head."""

from vlp.objectives.albef import ITM, MLM, MomentumITC
from vlp.objectives.base import Objective
from vlp.objectives.distributed import gather_no_grad, gather_with_grad, world_info
from vlp.objectives.generation import DenoisingLM, GenerativeITM, GenerativeVQA
from vlp.objectives.itc import ITC
from vlp.objectives.mim import MIM
from vlp.objectives.tasks import NLVR2, VE, VQA, Retrieval

__all__ = [
    "DenoisingLM",
    "GenerativeITM",
    "GenerativeVQA",
    "ITC",
    "ITM",
    "MIM",
    "MLM",
    "MomentumITC",
    "NLVR2",
    "Objective",
    "Retrieval",
    "VE",
    "VQA",
    "gather_no_grad",
    "gather_with_grad",
    "world_info",
]
