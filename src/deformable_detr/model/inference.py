"""Eager inference: where the model may take shortcuts that compute the same result to the bit.

With no gradient recorded nothing needs a layer's inputs again, so the model updates fresh tensors
in place, runs long sequences in blocks of rows and skips passes that would change nothing
(docs/design.md#memory-traffic-not-arithmetic-is-the-cpus-limit). Not while torch.compile or export
trace it: they take the recorded path, whose graph must not depend on the data.
"""

from __future__ import annotations

import torch


def eager_inference() -> bool:
    """Whether the model runs eagerly with no gradient recorded."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()
