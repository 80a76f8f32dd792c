"""Deprecated: release 0.1's path of sampling, now `truthgpt.nn.generation`."""

from truthgpt._moved import warn_moved

warn_moved("truthgpt.generation", "truthgpt.nn.generation")

from truthgpt.core.generation import (  # noqa: E402
    Streamer,
    TextStreamer,
    check_sampling_args,
    filter_logits,
    generate,
    next_token,
    slide_keep,
)

__all__ = [
    "Streamer",
    "TextStreamer",
    "check_sampling_args",
    "filter_logits",
    "generate",
    "next_token",
    "slide_keep",
]
