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
- With pytest-xdist (`make test`: `-n auto`), tests go to the workers one by one, except
  those sharing an expensive module fixture (a venv, a browser, two ranks, one fresh
  process, two trained models): each such group goes to one worker, which builds the fixture
  once. (xdist's own `xdist_group` marker renames node ids, which this pytest no longer
  allows.) The slowest go first, by the seconds their `slow` marker gives: a minute-long test
  started last would leave the other worker idle for that minute.
"""

import os
from pathlib import PurePosixPath

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

torch.set_num_threads(1)


# node ids (file name, or file name::test) -> the group that runs in one worker
XDIST_GROUPS = {
    "test_hf_remote.py": "exports and a venv",
    # its own venv: built on another worker at the same time (the exports are made twice)
    "test_hf_remote.py::test_lm_eval_scores_an_export": "exports and the lm-eval venv",
    "test_distributed.py": "two ranks",
    "test_explorer_browser.py": "browser",
    "test_attention_native.py::test_subnormal_floats_survive_an_l1_call": "fresh process",
    "test_attention_native.py::test_no_t_by_t_matrix_is_held_on_a_long_sequence": "fresh process",
    "test_hf_attention.py::test_trainer_both_learn": "two trained models",
    "test_hf_attention.py::test_trained_l1_is_l1_and_generates_consistently": "two trained models",
}


def slow_seconds(item) -> float:
    """About how long a test takes on two busy cores (`@pytest.mark.slow(seconds)`; a test of
    a module fixture's group carries the fixture's time), 0 for the rest."""
    mark = item.get_closest_marker("slow")
    return float(mark.args[0]) if mark and mark.args else 0.0


def pytest_collection_modifyitems(config, items):
    items.sort(key=slow_seconds, reverse=True)  # stable: the rest keep their order


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest without xdist: the hook below would be unknown
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:

    class GroupedScheduling(LoadScopeScheduling):
        """xdist's `--dist load` with XDIST_GROUPS kept together, in the collection's order
        (slowest first), not xdist's (largest groups first)."""

        def schedule(self) -> None:
            self.config.option.loadscopereorder = False
            super().schedule()

        def _split_scope(self, nodeid: str) -> str:
            path, _, test = nodeid.partition("::")
            name = PurePosixPath(path).name
            test = test.split("[")[0]
            return XDIST_GROUPS.get(f"{name}::{test}") or XDIST_GROUPS.get(name) or nodeid

    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") == "load":
            return GroupedScheduling(config, log)
        return None
