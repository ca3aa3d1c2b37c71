"""Training objectives: each returns ``{"<name>_loss": ..., metrics}`` and owns its head."""

from vlp.objectives.base import Objective
from vlp.objectives.causal_lm import CausalLM
from vlp.objectives.codebook_mim import CodebookMIM
from vlp.objectives.generation import DenoisingLM, GenerativeITM, GenerativeVQA
from vlp.objectives.itc import ITC
from vlp.objectives.itm import ITM
from vlp.objectives.mim import MIM
from vlp.objectives.mlm import MLM
from vlp.objectives.momentum_itc import MomentumITC
from vlp.objectives.tasks import NLVR2, VE, VQA, PairClassification, Retrieval
from vlp.objectives.text_tasks import TextTask
from vlp.utils.distributed import gather_no_grad, gather_with_grad, world_info

__all__ = [
    "CausalLM",
    "CodebookMIM",
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
    "PairClassification",
    "Retrieval",
    "TextTask",
    "VE",
    "VQA",
    "gather_no_grad",
    "gather_with_grad",
    "world_info",
]
