"""The model layer: the fast attention kernels (`truthgpt.nn.attention`: native C++, Triton,
blocked) joined to the core's backend registry, and `TruthGPTModel` with its verified
safetensors folders (`model`). The model's own code is the portable core, `truthgpt.core`;
this layer imports torch, the core, `truthgpt.config` and `truthgpt.io`."""
