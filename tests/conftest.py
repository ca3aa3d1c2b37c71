"""Shared fixtures: an offline environment and the MiniLM tokenizer."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import MINILM

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tokenizer():
    from vlp.data import HFTokenizer

    return HFTokenizer(MINILM, max_length=16)
