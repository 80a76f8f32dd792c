"""The model: distance attention (`truthgpt.nn.attention`), the GPT (`model`), sampling
(`generation`). It imports only torch, `truthgpt.config` and `truthgpt.io`."""
