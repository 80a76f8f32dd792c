"""Suite-wide settings.

- One intra-op thread: the models here are tiny, and a second thread brings nothing but
  waiting for it.
- The L1 kernel's block functions run eagerly (the same math); `test_attention_compiled.py`
  turns compilation on for itself, so the 10-30 s cold compile is paid once, not per file.
"""

import os

import torch

os.environ.setdefault("TRUTHGPT_COMPILE", "0")
torch.set_num_threads(1)
