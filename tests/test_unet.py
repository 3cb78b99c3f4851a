"""U-Net: logits at the input size for any H×W, gradients flow, channels_last works."""

from __future__ import annotations

import pytest
import torch

from wsiflow.models.unet import UNet


@pytest.mark.parametrize("size", [(37, 53), (64, 64), (1, 5), (17, 16), (100, 33)])
@pytest.mark.parametrize("out_ch", [1, 2])
def test_output_shape_any_size(size: tuple[int, int], out_ch: int) -> None:
    model = UNet(in_ch=3, out_ch=out_ch, depth=3, width=4).eval()
    x = torch.rand(2, 3, *size)
    with torch.inference_mode():
        y = model(x)
    assert y.shape == (2, out_ch, *size)
    assert torch.isfinite(y).all()


def test_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    model = UNet(3, 2, depth=2, width=4).eval()
    x = torch.rand(1, 3, 45, 31)
    with torch.inference_mode():
        a = model(x)
        b = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_padding_does_not_leak_batch_or_crop_wrongly() -> None:
    # The output for an image must not depend on other images in the batch.
    torch.manual_seed(1)
    model = UNet(3, 1, depth=3, width=4).eval()
    x = torch.rand(2, 3, 30, 30)
    with torch.inference_mode():
        both = model(x)
        one = model(x[:1])
    torch.testing.assert_close(both[:1], one, atol=1e-5, rtol=1e-4)


def test_backward_and_bad_args() -> None:
    model = UNet(3, 1, depth=2, width=4)
    y = model(torch.rand(2, 3, 24, 24))
    y.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError):
        UNet(3, 1, depth=0)
