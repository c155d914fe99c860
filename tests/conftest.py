"""Shared test setup. Triton's interpreter must be switched on before anything imports triton,
so it is set here, before any test module is collected, on machines without CUDA."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)
