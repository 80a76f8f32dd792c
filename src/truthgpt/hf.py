"""`import truthgpt.hf` registers model_type "truthgpt" with transformers' Auto classes.

The export lives in `truthgpt.workflows.hf`; this name stays because exported folders and
the scripts that load them use it.
"""

from truthgpt.workflows.hf import TruthGPTForCausalLM, TruthGPTHFConfig, export_hf, hf_tokenizer

__all__ = ["TruthGPTForCausalLM", "TruthGPTHFConfig", "export_hf", "hf_tokenizer"]
