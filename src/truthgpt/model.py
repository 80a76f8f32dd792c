"""Deprecated: release 0.1's path of the model, now `truthgpt.nn.model`."""

from truthgpt._moved import warn_moved

warn_moved("truthgpt.model", "truthgpt.nn.model")

from truthgpt.nn.model import MLP, Block, CausalLMOutput, TruthGPTModel  # noqa: E402

__all__ = ["MLP", "Block", "CausalLMOutput", "TruthGPTModel"]
