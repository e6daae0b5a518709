"""onnxruntime reference for the DINOv2 ViT: the wheel's own graph with every block's output exposed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from defectscope.backbones.vit import DEPTH, onnx_path

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def block_outputs(x: torch.Tensor, path: Path | None = None) -> list[np.ndarray]:
    """Hidden states after blocks 1..12 (tokens incl. the class token) for images 1 x 3 x 224 x 224 in [0, 1]."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path or onnx_path()))
    names = [f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in range(DEPTH)]
    produced = {o for node in model.graph.node for o in node.output}
    assert all(n in produced for n in names), "the ONNX graph's block outputs are not where they were"
    for n in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    xn = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return session.run(names, {"input_image": xn.numpy().astype(np.float32)})
