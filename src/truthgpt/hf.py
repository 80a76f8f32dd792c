"""`import truthgpt.hf` registers model_type "truthgpt" with transformers' Auto classes and the
`truthgpt_<kind>` attention implementations.

The export lives in `truthgpt.workflows.hf`, distance attention for any transformers model in
`truthgpt.workflows.hf_attention`; this name stays because exported folders and the scripts
that load them use it.
"""

from truthgpt.workflows.hf import TruthGPTForCausalLM, TruthGPTHFConfig, export_hf, hf_tokenizer
from truthgpt.workflows.hf_attention import (
    attn_implementation,
    lambdas,
    register_attention_functions,
    use_distance_attention,
)

__all__ = [
    "TruthGPTForCausalLM",
    "TruthGPTHFConfig",
    "attn_implementation",
    "export_hf",
    "hf_tokenizer",
    "lambdas",
    "register_attention_functions",
    "use_distance_attention",
]
