"""The portable model core: everything a TruthGPT model needs to run, in flat sibling modules
that import only torch, the standard library and each other (relatively), so that an
exported model folder carries these files byte for byte (`truthgpt.workflows.hf_remote`).

config (the model and training configs), kernel_codes and kinds (the registry of distances),
functional (`distance_attention`, the plain and SDPA paths, the backend registry), module
(`DistanceAttention`), positions (RoPE), cache (the KV cache), inputs, generation and model
(`TruthGPTModel` without persistence: `truthgpt.nn.model` adds safetensors loading and saving).
The fast kernels live above, in `truthgpt.nn.attention`, and join the registry when imported.
"""
