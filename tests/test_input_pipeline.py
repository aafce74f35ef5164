"""Input pipeline: sources, preprocessing, determinism, per-process slices, resume."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ddpm_jax import data_sources, input_pipeline, tfds_data
from tests.helpers import tiny_config, without_tensorflow


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def index_source(n, size=8):
    """Images whose pixel (0, 0, 0) encodes their index, to track which record a batch holds."""
    images = np.zeros((n, size, size, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    images[:, :, : size // 2, 1] = 255  # left half marked, to see flips
    return data_sources.ArraySource(images)


def test_bundled_faces_are_100_rgb_uint8_images():
    faces = data_sources.bundled_faces()
    assert faces.shape == (100, 25, 25, 3) and faces.dtype == np.uint8
    assert faces.std() > 10  # real pictures, not a constant


def test_batches_are_uint8_of_the_configured_size():
    config = tiny_config()
    source = data_sources.make_source(config.data)
    batch = next(iter(input_pipeline.create_dataset(config, source, process_index=0, process_count=1)))
    assert batch.shape == (8, 16, 16, 3) and batch.dtype == np.uint8


def test_same_seed_same_batches_other_seed_other_order():
    config = tiny_config()
    source = index_source(40)
    make = lambda: iter(input_pipeline.create_dataset(config, source, process_index=0,  # noqa: E731
                                                      process_count=1))
    a, b = take(make(), 6), take(make(), 6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    config.seed = 1
    c = take(make(), 6)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_each_epoch_is_a_permutation_and_epochs_differ():
    config = tiny_config()
    config.data.image_size = 8
    config.data.random_flip = False
    source = index_source(40)
    batches = take(iter(input_pipeline.create_dataset(config, source, process_index=0,
                                                      process_count=1)), 10)
    ids = np.concatenate([b[:, 0, 0, 0] for b in batches])
    first, second = ids[:40], ids[40:80]
    assert sorted(first) == list(range(40)) and sorted(second) == list(range(40))
    assert not np.array_equal(first, second)


def test_two_processes_together_read_the_one_process_batches():
    config = tiny_config()
    source = index_source(40)
    one = take(iter(input_pipeline.create_dataset(config, source, process_index=0,
                                                  process_count=1)), 7)
    parts = [take(iter(input_pipeline.create_dataset(config, source, process_index=p,
                                                     process_count=2)), 7) for p in range(2)]
    for whole, first, second in zip(one, *parts, strict=True):
        np.testing.assert_array_equal(whole, np.concatenate([first, second]))


def test_processes_read_disjoint_slices_that_cover_the_set():
    config = tiny_config()
    config.data.image_size = 8
    config.batch_size = 8
    config.data.random_flip = False
    source = index_source(40)
    seen = []
    for process in range(2):
        it = iter(input_pipeline.create_dataset(config, source, process_index=process, process_count=2))
        ids = np.concatenate([b[:, 0, 0, 0] for b in take(it, 5)])  # 5 x 4 = one epoch of 20
        assert sorted(ids) == sorted(set(ids))
        seen.append(set(ids.tolist()))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(40))


def test_restored_iterator_continues_with_the_same_batches():
    config = tiny_config()
    source = index_source(30)
    dataset = input_pipeline.create_dataset(config, source, process_index=0, process_count=1)
    straight = iter(dataset)
    take(straight, 5)
    state = straight.get_state()
    expected = take(straight, 6)  # crosses an epoch boundary (30 images, batch 8)
    resumed = iter(dataset)
    resumed.set_state(state)
    for x, y in zip(expected, take(resumed, 6), strict=True):
        np.testing.assert_array_equal(x, y)


def test_start_example_skips_to_the_same_batches():
    config = tiny_config()
    source = index_source(30)
    straight = take(iter(input_pipeline.create_dataset(config, source, process_index=0,
                                                       process_count=1)), 7)
    for processes in (1, 2):
        config.batch_size = 8
        parts = [take(iter(input_pipeline.create_dataset(
            config, source, process_index=p, process_count=processes, start_example=32)), 3)
            for p in range(processes)]
        for expected, *pieces in zip(straight[4:], *parts, strict=True):
            np.testing.assert_array_equal(expected, np.concatenate(pieces))


def test_another_batch_size_continues_at_the_next_unseen_example():
    """The stream of examples (order and flips) does not depend on the batch size: batches
    of 4 from example 12 are the examples 12... of a run with batches of 8."""
    config = tiny_config()
    config.data.random_flip = True
    source = index_source(30)
    config.batch_size = 8
    stream = np.concatenate(take(iter(input_pipeline.create_dataset(
        config, source, process_index=0, process_count=1)), 6))
    config.batch_size = 4
    resumed = np.concatenate(take(iter(input_pipeline.create_dataset(
        config, source, process_index=0, process_count=1, start_example=12)), 5))
    np.testing.assert_array_equal(resumed, stream[12:32])


def test_flip_is_random_per_image():
    config = tiny_config()
    config.data.image_size = 8
    config.data.random_flip = True
    source = index_source(200)
    config.batch_size = 200
    batch = next(iter(input_pipeline.create_dataset(config, source, process_index=0, process_count=1)))
    flipped = batch[:, 0, -1, 1] == 255  # the marked left half moved to the right
    assert 0.35 < flipped.mean() < 0.65


def test_preprocess_converts_gray_and_rgba_and_crops():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    rgb = input_pipeline.to_rgb(gray)
    assert rgb.shape == (8, 8, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])
    rgba = np.zeros((4, 4, 4), np.uint8)
    assert input_pipeline.to_rgb(rgba).shape == (4, 4, 3)
    image = np.arange(6 * 10, dtype=np.uint8).reshape(6, 10, 1).repeat(3, axis=-1)
    center = data_sources.crop_image(image, "center", 4, ())
    np.testing.assert_array_equal(center[..., 0], image[1:5, 3:7, 0])
    box = data_sources.crop_image(image, "box", 0, (2, 1, 3, 5))
    np.testing.assert_array_equal(box[..., 0], image[2:5, 1:6, 0])
    with pytest.raises(data_sources.DataError, match="crop_size"):
        data_sources.crop_image(image, "center", 7, ())


def test_resize_is_antialiased():
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255  # a 1-pixel pattern a plain subsample would alias to 0 or 255
    small = input_pipeline.resize_image(stripes, 8)
    assert small.shape == (8, 8, 3)
    assert 100 < small.mean() < 155 and small.std() < 20


def test_folder_source_reads_images_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.full((10, 12, 3), 200, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((10, 12), 50, np.uint8)).save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    config = tiny_config()
    config.data.source = "folder"
    config.data.path = str(tmp_path)
    source = data_sources.make_source(config.data)
    assert len(source) == 2 and source[1].shape == (10, 12, 3)


def test_missing_and_empty_folders_say_which_field(tmp_path):
    config = tiny_config()
    config.data.source = "folder"
    config.data.path = str(tmp_path / "nope")
    with pytest.raises(data_sources.DataError, match="data.path"):
        data_sources.make_source(config.data)
    config.data.path = str(tmp_path)
    with pytest.raises(data_sources.DataError, match="holds no"):
        data_sources.make_source(config.data)


def celeba_data_config(tmp_path):
    from configs import celeba

    config = celeba.get_config()
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.download = False
    return config


def test_unprepared_celeba_names_the_files_for_manual_dir(tmp_path):
    config = celeba_data_config(tmp_path)
    with pytest.raises(data_sources.DataError) as info:
        data_sources.make_source(config.data)
    message = str(info.value)
    assert "manual_dir" in message
    for name in ("img_align_celeba.zip", "list_eval_partition.txt", "list_attr_celeba.txt",
                 "list_landmarks_align_celeba.txt", "identity_CelebA.txt"):
        assert name in message


def test_without_tensorflow_an_unprepared_dataset_says_to_install_it_before_any_build(
        tmp_path, monkeypatch):
    without_tensorflow(monkeypatch)
    config = celeba_data_config(tmp_path)
    with pytest.raises(data_sources.DataError, match="manual_dir") as info:
        data_sources.make_source(config.data)
    assert str(info.value).splitlines()[-1] == tfds_data.BUILD_NEEDS_TENSORFLOW
    assert 'pip install -e ".[tfds]"' in tfds_data.BUILD_NEEDS_TENSORFLOW
    config.data.manual_dir = str(tmp_path)  # would build: refused before TFDS starts
    with pytest.raises(data_sources.DataError,
                       match=r"'celeb_a' is not prepared yet\. TFDS builds data sets with TensorFlow"):
        data_sources.make_source(config.data)


def test_unknown_tfds_name_is_a_clear_error(tmp_path):
    config = celeba_data_config(tmp_path)
    config.data.name = "no_such_dataset_xyz"
    with pytest.raises(data_sources.DataError, match="unknown TFDS dataset"):
        data_sources.make_source(config.data)


def test_celeba_through_tfds_mock_data(tmp_path):
    config = celeba_data_config(tmp_path)
    config.batch_size = 4
    config.data.image_size = 16
    with tfds.testing.mock_data(num_examples=12):
        source = data_sources.make_source(config.data)
        assert len(source) == 12 and source[0].shape == (218, 178, 3)
        batch = next(iter(input_pipeline.create_dataset(config, source, process_index=0,
                                                        process_count=1)))
    assert batch.shape == (4, 16, 16, 3) and batch.dtype == np.uint8


def make_messy_folder(root, good=20):
    """Good RGB JPEGs plus grayscale, RGBA, corrupt and truncated files."""
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / f"rgb{i}.jpg")
    Image.fromarray(np.full((40, 30), 77, np.uint8)).save(root / "gray.png")
    Image.fromarray(np.full((40, 30, 4), 200, np.uint8), "RGBA").save(root / "rgba.png")
    (root / "corrupt.jpg").write_bytes(b"definitely not a jpeg")
    full = (root / "rgb0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])  # header fine, data cut


def folder_config(path, **data):
    config = tiny_config()
    config.data.source = "folder"
    config.data.path = str(path)
    config.data.image_size = 8
    config.data.random_flip = False
    for key, value in data.items():
        config.data[key] = value
    return config


def test_folder_skips_corrupt_files_and_converts_gray_and_rgba(tmp_path):
    make_messy_folder(tmp_path)
    config = folder_config(tmp_path, max_bad_fraction=0.2)
    source = data_sources.make_source(config.data)
    assert len(source) == 23  # the corrupt header is dropped up front; the truncated file is not
    truncated = [p for p in source._paths if source.read(p) is None]
    assert [os.path.basename(p) for p in truncated] == ["truncated.jpg"]  # ...it fails when read
    index = source._paths.index(truncated[0])
    np.testing.assert_array_equal(source[index], source[(index + 1) % len(source)])  # replaced
    config.batch_size = 22
    batches = take(iter(input_pipeline.create_dataset(config, source, process_index=0,
                                                      process_count=1)), 2)
    for batch in batches:
        assert batch.shape == (22, 8, 8, 3) and batch.dtype == np.uint8
    gray = [p for p in source._paths if np.all(source.read(p) == 77)]
    assert len(gray) == 1  # grayscale became 3 equal channels


def test_too_many_bad_files_fail_before_training(tmp_path):
    make_messy_folder(tmp_path, good=3)
    with pytest.raises(data_sources.DataError, match="data.max_bad_fraction"):
        data_sources.make_source(folder_config(tmp_path, max_bad_fraction=0.1).data)


def test_images_smaller_than_the_crop_fail_before_training(tmp_path):
    make_messy_folder(tmp_path)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "small.png")
    config = folder_config(tmp_path, crop="center", crop_size=24, max_bad_fraction=0.2)
    with pytest.raises(data_sources.DataError, match="small.png.*data.crop_size"):
        data_sources.make_source(config.data)


def png_16bit(pixels):
    """A 16-bit PNG (RGB or RGBA) written by hand: PIL cannot write one."""
    import struct
    import zlib

    height, width, channels = pixels.shape

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, {3: 2, 4: 6}[channels], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_images_are_decoded_as_people_see_them(tmp_path):
    # 16-bit grayscale: the top 8 bits (x / 257), not clipped to white
    Image.fromarray(np.full((4, 6), 257 * 100, np.uint16)).save(tmp_path / "gray16.png")
    # 16-bit RGB with alpha: half-transparent red on the white background
    rgba16 = np.zeros((4, 6, 4), np.uint16)
    rgba16[..., 0], rgba16[..., 3] = 65535, 257 * 128
    (tmp_path / "rgba16.png").write_bytes(png_16bit(rgba16))
    # float (TIFF, mode F) read as [0, 1]
    Image.fromarray(np.full((4, 6), 0.5, np.float32)).save(tmp_path / "float.tif")
    # fully transparent pixels stored black show the background, not black
    clear = np.zeros((4, 6, 4), np.uint8)
    Image.fromarray(clear, "RGBA").save(tmp_path / "clear.png")
    # a palette image with a transparent index
    palette = Image.fromarray(np.zeros((4, 6), np.uint8), "P")
    palette.putpalette([10, 20, 30] * 256)
    palette.save(tmp_path / "palette.png", transparency=0)
    # a phone photo stored sideways: 6x4 pixels, EXIF orientation 6 (rotate 90 clockwise)
    sideways = np.zeros((4, 6, 3), np.uint8)
    sideways[:, 0] = 255  # the stored left column becomes the top row
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(sideways).save(tmp_path / "phone.png", exif=exif)

    read = lambda name: data_sources.read_image(str(tmp_path / name))  # noqa: E731
    assert np.all(read("gray16.png") == 100)
    np.testing.assert_allclose(read("rgba16.png")[0, 0], [255, 127, 127], atol=1)
    assert np.all(read("float.tif") == 128)
    assert np.all(read("clear.png") == 255) and np.all(read("palette.png") == 255)
    phone = read("phone.png")
    assert phone.shape == (6, 4, 3) and np.all(phone[0] == 255) and np.all(phone[1:] == 0)
    for name in ("gray16.png", "rgba16.png", "float.tif", "clear.png", "palette.png",
                 "phone.png"):
        assert read(name).dtype == np.uint8 and read(name).shape[-1] == 3
    # the folder source (training, fid-stats) decodes the same, and sizes the rotated photo
    config = folder_config(tmp_path, image_size=4, crop="center", crop_size=4)
    source = data_sources.make_source(config.data)
    assert len(source) == 6
    for index, path in enumerate(source._paths):
        np.testing.assert_array_equal(source[index], data_sources.read_image(path))


def test_images_without_a_reading_people_share_are_refused_naming_why(tmp_path, monkeypatch):
    # NaN pixels would become black; 32-bit integers have no range (200 read as 16-bit is 1);
    # both are refused, and the folder source skips such a file, naming it and the reason.
    nan = np.full((4, 6), 0.5, np.float32)
    nan[0, 0] = np.nan
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    Image.fromarray(np.full((4, 6), 200, np.int32)).save(tmp_path / "int32.tif")
    with pytest.raises(ValueError, match="1 pixels are NaN or infinite"):
        data_sources.read_image(str(tmp_path / "nan.tif"))
    with pytest.raises(ValueError, match="32-bit integer pixels have no standard range"):
        data_sources.read_image(str(tmp_path / "int32.tif"))
    from absl import logging

    lines = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: lines.append(msg % args))
    source = data_sources.FolderSource([str(tmp_path / "nan.tif"), str(tmp_path / "int32.tif")])
    assert source.read(str(tmp_path / "nan.tif")) is None
    assert any("nan.tif" in line and "NaN or infinite" in line for line in lines)


def test_symlinked_folders_are_followed_once_and_unreadable_ones_reported(
        tmp_path, monkeypatch):
    from absl import logging

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for folder, name in ((data, "a.png"), (data / "sub", "b.png"), (elsewhere, "c.png")):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / name)
    (data / "linked").symlink_to(elsewhere)  # followed
    (data / "sub" / "loop").symlink_to(data)  # a loop: scanned once
    (data / "locked").mkdir()
    (data / "locked" / "d.png").write_bytes((data / "a.png").read_bytes())
    real_scandir = os.scandir

    def scandir(path="."):  # a folder this user may not read (root reads everything)
        if os.path.basename(os.fspath(path)) == "locked":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
    files = data_sources.list_image_files(str(data))
    assert [os.path.relpath(f, data) for f in files] == ["a.png", "linked/c.png", "sub/b.png"]
    assert any("locked" in w and "Permission denied" in w for w in warnings)


def test_each_skipped_file_is_logged_with_its_reason(tmp_path, monkeypatch):
    from absl import logging

    make_messy_folder(tmp_path)
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
    data_sources.make_source(folder_config(tmp_path, max_bad_fraction=0.2).data)
    corrupt = [w for w in warnings if "corrupt.jpg" in w]
    assert len(corrupt) == 1 and "UnidentifiedImageError" in corrupt[0]


def test_a_remote_workdir_without_tensorflow_names_the_extra_to_install(monkeypatch):
    from ddpm_jax.train import config_checks

    without_tensorflow(monkeypatch)
    with pytest.raises(config_checks.ConfigError,
                       match=r"gs://bucket/run.* not writable .*: pip install -e \"\.\[tfds\]\"$"):
        config_checks.check_workdir_writable("gs://bucket/run")
