"""One line of training throughput for summaries: tokens per second and, on a GPU, peak memory."""

from __future__ import annotations

import torch


def throughput_line(tokens: int, seconds: float, device: torch.device | str) -> str:
    """``"<tokens/s> tokens/s over <tokens> tokens in <s> s[, peak GPU memory <GiB> GiB]"``.

    Peak memory is ``torch.cuda.max_memory_allocated`` on a CUDA device (what the caching allocator
    handed out, the figure that decides whether a batch fits); other devices report none.
    """
    device = torch.device(device)
    rate = tokens / seconds if seconds > 0 else float("nan")
    line = f"{rate:,.0f} tokens/s over {tokens:,} tokens in {seconds:.1f} s"
    if device.type == "cuda" and torch.cuda.is_available():
        line += f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    return line
