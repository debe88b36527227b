"""Deep (10-16 bit) images reach the model the same way in training (``model``) and in the
service (``adapters``): one rule, leuk_fhir.sample_depth."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from leuk_fhir.adapters import open_acquisition
from leuk_fhir.model.images import decode_image
from leuk_fhir.model.synthetic import generate_cell
from leuk_fhir.sample_depth import deep_to_uint8, sample_bits


def test_depth_is_declared_or_the_camera_depth_of_the_brightest_sample() -> None:
    assert [sample_bits(v) for v in (0, 255, 256, 1023, 1024, 4095, 16383, 65535)] == [
        8, 8, 10, 10, 12, 12, 14, 16]
    assert sample_bits(300, declared=12) == 12
    assert deep_to_uint8(np.array([0, 2047, 4095]), 12).tolist() == [0, 127, 255]
    assert deep_to_uint8(np.array([-5, 200])).tolist() == [0, 200]


@pytest.mark.parametrize(("scale", "fmt", "info"), [
    (257, "PNG", {}),  # full-range 16-bit
    (16, "TIFF", {}),  # 12-bit camera data in a 16-bit file
    (16, "TIFF", {"tiffinfo": {341: 8191}}),  # a file that declares 13 bits
])
def test_training_and_the_service_decode_deep_images_alike(tmp_path, scale, fmt, info) -> None:
    gray = np.asarray(Image.fromarray(generate_cell("blast", 5, 64)).convert("L"))
    path = tmp_path / f"deep.{fmt.lower()}"
    Image.fromarray(gray.astype(np.uint16) * scale).save(path, format=fmt, **info)
    trained = decode_image(path, 10**8)
    acquisition = open_acquisition(path)
    try:
        served = acquisition.pixels.read_region(0, 0, 64, 64)
    finally:
        acquisition.pixels.close()
    assert np.array_equal(trained, served)
    assert trained.max() > 100  # not the near-black image a fixed 16-bit divisor made
