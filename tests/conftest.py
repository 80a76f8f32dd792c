"""Suite-wide settings.

- One intra-op thread: the models here are tiny, and a second thread brings nothing but
  waiting for it (tests that need two threads set them themselves).
- Attention runs on the default backend (native where it was built), as users run it;
  `test_attention.py` runs the eager kernel too, `test_attention_compiled.py` the compiled one.
"""

import torch

torch.set_num_threads(1)
