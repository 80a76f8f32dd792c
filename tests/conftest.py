"""Suite-wide settings.

- One intra-op thread: the models here are tiny, and a second thread brings nothing but
  waiting for it (tests that need two threads set them themselves).
- Attention runs on the default backend (native where it was built), as users run it;
  `test_attention.py` runs the eager kernel too, `test_attention_compiled.py` the compiled one.
- Without a CUDA device, TRITON_INTERPRET=1 (unless set otherwise): Triton's interpreter then
  runs the GPU attention kernels on CPU tensors (`test_attention_triton.py`). Triton reads it
  when a kernel is defined, and torch imports triton early (torch._dynamo does), so it is set
  here, before any test module is imported. Without a GPU triton compiles nothing anyway, and
  `auto` never picks the Triton kernels for CPU tensors: nothing else changes.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

torch.set_num_threads(1)
