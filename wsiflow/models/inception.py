"""The cell classifier: torchvision's InceptionV3, trained from scratch (no downloads).

The network is fully convolutional up to a global average pool, so any input of at least
75×75 px works; the paper's crops were 64 px, which InceptionV3 cannot take. The input size
travels in the bundle card (``input_px``) and must equal the pipeline's ``classifier.input_px``:
the shipped mds pipeline uses 80 px, ``wsiflow train classifier --input-px`` defaults to 96.
Normalisation happens outside the network (the bundle card holds it).
"""

from __future__ import annotations

from torch import nn
from torchvision.models import inception_v3

from wsiflow.errors import ModelError

MIN_INPUT_PX = 75


def build_inception_v3(
    num_classes: int,
    aux_logits: bool = False,
    dropout: float = 0.5,
    init_weights: bool = True,
) -> nn.Module:
    """InceptionV3 with ``num_classes`` outputs and random (truncated-normal) initial weights."""
    if num_classes < 2:
        raise ModelError(f"inception_v3 needs at least 2 classes, got {num_classes}")
    model = inception_v3(
        weights=None,
        num_classes=num_classes,
        aux_logits=aux_logits,
        init_weights=init_weights,
        transform_input=False,
        dropout=dropout,
    )
    if init_weights:
        # torchvision draws every layer, the classifier included, from N(0, 0.1²): with 2048
        # inputs that makes the first logits huge (initial loss ≈ 5 instead of ln K). A small
        # classifier init starts training at ln K.
        nn.init.normal_(model.fc.weight, std=0.01)
        nn.init.zeros_(model.fc.bias)
    return model


def check_input_px(input_px: int) -> int:
    if input_px < MIN_INPUT_PX:
        raise ModelError(f"inception_v3 needs inputs of at least {MIN_INPUT_PX} px, got {input_px}")
    return input_px
