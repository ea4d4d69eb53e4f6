import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.errors import DatasetError
from lora_trainer.images import image_size, image_to_tensor, load_image, to_rgb

ORIENTATION = 0x0112


def _stored_mode(path):
    with Image.open(path) as img:
        return img.mode


def _close(a, b, tol=12):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def _exif_rotated(path, fmt):
    # Stored 40x20: left half red, right half blue; orientation 6 = "rotate 90 degrees clockwise to view".
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    img.save(path, fmt, exif=exif)
    return path


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    path = _exif_rotated(tmp_path / "rot.jpg", "JPEG")
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.size == (20, 40)
    # Rotating clockwise moves the stored left edge (red) to the top.
    assert _close(img.getpixel((10, 5)), (255, 0, 0), 30)
    assert _close(img.getpixel((10, 35)), (0, 0, 255), 30)
    assert image_size(path) == (20, 40)


def test_exif_orientation_in_png_header(tmp_path):
    path = _exif_rotated(tmp_path / "rot.png", "PNG")
    assert image_size(path) == (20, 40)
    assert load_image(path).size == (20, 40)


def test_rgba_transparency_becomes_white(tmp_path):
    img = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black
    img.putpixel((2, 0), (0, 0, 0, 128))  # half transparent black
    img.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((1, 0)) == (255, 255, 255)
    assert _close(out.getpixel((2, 0)), (127, 127, 127), 2)


def test_la_transparency_becomes_white(tmp_path):
    img = Image.new("LA", (2, 1), (50, 255))
    img.putpixel((1, 0), (0, 0))
    img.save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    assert out.getpixel((0, 0)) == (50, 50, 50)
    assert out.getpixel((1, 0)) == (255, 255, 255)


def test_palette_with_transparency_becomes_white(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    assert _stored_mode(tmp_path / "p.png") == "P"
    out = load_image(tmp_path / "p.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (255, 0, 0)


def test_gif_with_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.putpixel((1, 0), 1)
    img.save(tmp_path / "t.gif", transparency=0)
    out = load_image(tmp_path / "t.gif")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 255, 0)


def test_palette_without_transparency(tmp_path):
    img = Image.new("P", (1, 1))
    img.putpalette([12, 34, 56] + [0] * 765)
    img.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (12, 34, 56)


def test_grayscale_and_bilevel(tmp_path):
    Image.new("L", (3, 3), 77).save(tmp_path / "l.png")
    assert load_image(tmp_path / "l.png").getpixel((1, 1)) == (77, 77, 77)
    bits = Image.new("1", (2, 1), 0)
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "b.png")
    out = load_image(tmp_path / "b.png")
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 32896]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert _stored_mode(tmp_path / "g16.png").startswith("I")  # the case this test is about
    out = load_image(tmp_path / "g16.png")
    assert [out.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255),
                                                        (128, 128, 128)]


def test_32_bit_int_tiff_is_read_as_16_bit_range(tmp_path):
    Image.fromarray(np.array([[0, 65535, 257 * 20]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert _stored_mode(tmp_path / "i.tif") == "I"
    out = load_image(tmp_path / "i.tif")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 255, 20]


def test_float_tiff(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert _stored_mode(tmp_path / "f.tif") == "F"
    out = load_image(tmp_path / "f.tif")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert _stored_mode(tmp_path / "c.jpg") == "CMYK"
    out = load_image(tmp_path / "c.jpg")
    assert out.mode == "RGB"
    assert _close(out.getpixel((8, 8)), (255, 0, 0), 10)


def test_ycbcr_to_rgb():
    img = Image.new("RGB", (2, 2), (200, 40, 90)).convert("YCbCr")
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert _close(out.getpixel((0, 0)), (200, 40, 90), 3)


def _noise_png(path, size=(64, 64)):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


def _assert_one_line_error(exc_info, path, reason):
    message = str(exc_info.value)
    assert message.startswith(f"{path}: cannot be read as an image (")
    assert reason in message
    assert "\n" not in message


def test_truncated_png_fails_on_load_but_header_is_cheap(tmp_path):
    data = _noise_png(tmp_path / "full.png")
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    assert image_size(path) == (64, 64)  # header only: no pixels decoded
    with pytest.raises(DatasetError) as exc_info:
        load_image(path)
    _assert_one_line_error(exc_info, path, "truncated")


def test_truncated_header_fails_in_image_size(tmp_path):
    data = _noise_png(tmp_path / "full.png")
    path = tmp_path / "head.png"
    path.write_bytes(data[:20])
    with pytest.raises(DatasetError) as exc_info:
        image_size(path)
    _assert_one_line_error(exc_info, path, "")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(b"")
    for read in (load_image, image_size):
        with pytest.raises(DatasetError) as exc_info:
            read(path)
        _assert_one_line_error(exc_info, path, "empty file")


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    for read in (load_image, image_size):
        with pytest.raises(DatasetError) as exc_info:
            read(path)
        _assert_one_line_error(exc_info, path, "not an image")


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError) as exc_info:
        load_image(tmp_path / "gone.png")
    _assert_one_line_error(exc_info, tmp_path / "gone.png", "not found")


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (30, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 900 pixels > 2 * 100: PIL refuses outright
    for read in (load_image, image_size):
        with pytest.raises(DatasetError) as exc_info:
            read(tmp_path / "big.png")
        _assert_one_line_error(exc_info, tmp_path / "big.png", "decompression bomb")


# -- image_to_tensor ---------------------------------------------------------------------------

def test_tensor_shape_dtype_and_exact_values():
    img = Image.new("RGB", (8, 4), (255, 0, 0))
    img.putpixel((0, 0), (0, 255, 128))
    t = image_to_tensor(img, (8, 4))
    assert t.shape == (3, 4, 8) and t.dtype == torch.float32
    assert t[:, 1, 1].tolist() == [1.0, -1.0, -1.0]
    assert t[:, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    assert t.min() >= -1 and t.max() <= 1


def test_downscale_covers_bucket_and_crops_the_sides():
    # 200x100, blue bands on the left and right; the bucket is square so the sides are cropped away.
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 25, 100))
    img.paste((0, 0, 255), (175, 0, 200, 100))
    t = image_to_tensor(img, (64, 64))
    assert t.shape == (3, 64, 64)
    assert torch.allclose(t[0], torch.ones(64, 64), atol=0.05)  # red everywhere
    assert torch.allclose(t[2], -torch.ones(64, 64), atol=0.05)  # no blue left


def test_upscale_covers_bucket_and_crops_top_and_bottom():
    img = Image.new("RGB", (16, 32), (0, 255, 0))
    img.paste((255, 255, 255), (0, 0, 16, 4))  # top band, cropped away
    t = image_to_tensor(img, (64, 64))
    assert t.shape == (3, 64, 64)
    assert torch.allclose(t[0], -torch.ones(64, 64), atol=0.05)
    assert torch.allclose(t[1], torch.ones(64, 64), atol=0.05)


def test_non_square_bucket_shape():
    t = image_to_tensor(Image.new("RGB", (300, 300), (0, 0, 0)), (128, 64))
    assert t.shape == (3, 64, 128)
    assert torch.allclose(t, -torch.ones_like(t))


def test_resample_filter_depends_on_direction(monkeypatch):
    seen = []
    original = Image.Image.resize

    def spy(self, size, resample=None, *args, **kwargs):
        seen.append(resample)
        return original(self, size, resample, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    image_to_tensor(Image.new("RGB", (128, 128)), (64, 64))
    image_to_tensor(Image.new("RGB", (32, 32)), (64, 64))
    image_to_tensor(Image.new("RGB", (64, 64)), (64, 64))  # exact fit: no resize at all
    assert seen == [Image.Resampling.LANCZOS, Image.Resampling.BICUBIC]


def test_flip_mirrors_horizontally():
    img = Image.new("RGB", (8, 8), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 3, 8))
    plain = image_to_tensor(img, (8, 8))
    flipped = image_to_tensor(img, (8, 8), flip=True)
    assert torch.equal(flipped, torch.flip(plain, dims=[2]))
    assert flipped[0, 0, 7].item() == 1.0 and flipped[0, 0, 0].item() == -1.0


def test_tensor_accepts_non_rgb_images():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    t = image_to_tensor(rgba, (4, 4))
    assert torch.equal(t, torch.ones(3, 4, 4))  # transparent -> white
