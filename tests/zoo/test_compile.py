"""torch.compile of a whole zoo model on the CPU: one graph, no break, the eager logits."""

from __future__ import annotations

import timm
import torch

import zoo  # noqa: F401


def test_biformer_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = timm.create_model("zoo_biformer_t", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    # fullgraph=True raises on any graph break; the eager backend keeps the test to Dynamo's capture.
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
