"""Tests of LFW-layout image folders (raydefense.data.folder): each documented behaviour."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from raydefense.data import FaceAligner, list_image_folder, load_image, load_images, render_identity_images
from raydefense.errors import DataError, StorageError

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (20, 40, 210)


def _solid(colour, size=(24, 24)) -> Image.Image:
    return Image.new("RGB", size, colour)


@pytest.fixture()
def lfw(tmp_path):
    """root/{alice: 4 images + junk, bob: 3 images, carol: 1 image} plus ignorable clutter."""
    root = tmp_path / "lfw"
    (root / "alice").mkdir(parents=True)
    (root / "bob").mkdir()
    (root / "carol").mkdir()
    _solid(RED).save(root / "alice" / "alice_0001.jpg", quality=95)
    Image.new("L", (24, 24), 100).save(root / "alice" / "alice_0002.PNG")  # grayscale, upper-case extension
    rgba = Image.new("RGBA", (24, 24), (0, 0, 0, 0))  # fully transparent
    rgba.save(root / "alice" / "alice_0003.png")
    pal = _solid(BLUE).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    pal.save(root / "alice" / "alice_0004.bmp")
    (root / "alice" / "notes.txt").write_text("not an image")
    _solid(GREEN).save(root / "alice" / ".hidden.jpg")
    _solid(GREEN).save(root / "bob" / "bob_0001.jpeg", quality=95)
    sixteen = np.full((24, 24), 65535, dtype=np.uint16)
    sixteen[:, 12:] = 32896  # 128 * 257
    Image.fromarray(sixteen).save(root / "bob" / "bob_0002.png")  # 16-bit grayscale (I;16)
    _solid(RED).save(root / "bob" / "bob_0003.WebP", lossless=True)
    (root / "bob" / "deeper").mkdir()
    _solid(RED).save(root / "bob" / "deeper" / "nested.jpg")  # deeper than root/<id>/<file>
    _solid(BLUE).save(root / "carol" / "carol_0001.png")
    (root / ".git").mkdir()
    _solid(BLUE).save(root / ".git" / "blob.png")  # hidden folder
    (root / "README.txt").write_text("root-level file")
    return root


class TestListing:
    def test_classes_labels_records(self, lfw):
        listing = list_image_folder(str(lfw))
        assert listing.classes == ["alice", "bob", "carol"]
        assert listing.skipped_identities == []
        names = [(r.identity, os.path.basename(r.path), r.label) for r in listing.records]
        assert names == [
            ("alice", "alice_0001.jpg", 0), ("alice", "alice_0002.PNG", 0), ("alice", "alice_0003.png", 0),
            ("alice", "alice_0004.bmp", 0), ("bob", "bob_0001.jpeg", 1), ("bob", "bob_0002.png", 1),
            ("bob", "bob_0003.WebP", 1), ("carol", "carol_0001.png", 2),
        ]
        assert all(os.path.isabs(r.path) and os.path.exists(r.path) for r in listing.records)

    def test_min_images_drops_and_relabels(self, lfw):
        listing = list_image_folder(str(lfw), min_images_per_identity=4)
        assert listing.classes == ["alice"]
        assert listing.skipped_identities == ["bob", "carol"]
        assert {r.label for r in listing.records} == {0} and len(listing.records) == 4

    def test_everything_dropped_names_root(self, lfw):
        with pytest.raises(DataError, match=str(lfw)):
            list_image_folder(str(lfw), min_images_per_identity=5)

    def test_empty_identity_folder(self, lfw):
        (lfw / "dave").mkdir()
        with pytest.raises(DataError, match=r"dave.* is empty"):
            list_image_folder(str(lfw))

    def test_identity_with_only_junk_is_empty(self, lfw):
        (lfw / "erin").mkdir()
        (lfw / "erin" / "list.txt").write_text("x")
        with pytest.raises(DataError, match=r"erin.* is empty"):
            list_image_folder(str(lfw))

    def test_missing_root(self, tmp_path):
        missing = tmp_path / "nowhere"
        with pytest.raises(DataError, match=f"{missing} does not exist"):
            list_image_folder(str(missing))

    def test_root_is_a_file(self, tmp_path):
        path = tmp_path / "file.jpg"
        _solid(RED).save(path)
        with pytest.raises(DataError, match=str(path)):
            list_image_folder(str(path))

    def test_root_without_identity_folders(self, tmp_path):
        _solid(RED).save(tmp_path / "loose.jpg")
        with pytest.raises(DataError, match=f"{tmp_path} has no identity sub-folders"):
            list_image_folder(str(tmp_path))

    def test_root_without_any_image(self, tmp_path):
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "x.txt").write_text("x")
        with pytest.raises(DataError, match=f"{tmp_path} has no image files"):
            list_image_folder(str(tmp_path))

    def test_bad_min_images(self, lfw):
        from raydefense.errors import ConfigError

        with pytest.raises(ConfigError, match="min_images_per_identity"):
            list_image_folder(str(lfw), min_images_per_identity=0)


class TestLoad:
    def _path(self, lfw, identity, name):
        return str(lfw / identity / name)

    def test_rgb_shape_dtype(self, lfw):
        img, found = load_image(self._path(lfw, "alice", "alice_0001.jpg"), image_size=16)
        assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and found is True
        assert np.abs(img.astype(int) - RED).max() <= 6  # JPEG rounding only

    def test_grayscale_to_rgb(self, lfw):
        img, _ = load_image(self._path(lfw, "alice", "alice_0002.PNG"), image_size=12)
        assert img.shape == (12, 12, 3)
        assert (img == 100).all()

    def test_transparent_composited_on_white(self, lfw):
        img, _ = load_image(self._path(lfw, "alice", "alice_0003.png"), image_size=12)
        assert (img == 255).all()

    def test_palette_to_rgb(self, lfw):
        img, _ = load_image(self._path(lfw, "alice", "alice_0004.bmp"), image_size=12)
        assert np.abs(img.astype(int) - BLUE).max() <= 2

    def test_sixteen_bit_scaled(self, lfw):
        assert Image.open(lfw / "bob" / "bob_0002.png").mode.startswith("I")
        img, _ = load_image(self._path(lfw, "bob", "bob_0002.png"), image_size=24)
        assert (img[:, :10] == 255).all() and (img[:, 14:] == 128).all()

    def test_webp(self, lfw):
        img, _ = load_image(self._path(lfw, "bob", "bob_0003.WebP"), image_size=8)
        assert np.abs(img.astype(int) - RED).max() <= 2

    def test_centre_crop_then_resize(self, tmp_path):
        """A wide image loses its left and right bands; the centre square is kept."""
        wide = np.zeros((40, 60, 3), dtype=np.uint8)
        wide[:, :10] = RED
        wide[:, 10:50] = GREEN
        wide[:, 50:] = BLUE
        Image.fromarray(wide).save(tmp_path / "wide.png")
        img, _ = load_image(str(tmp_path / "wide.png"), image_size=20)
        assert (img == GREEN).all()

    def test_resize_is_antialiased(self, tmp_path):
        """A one-pixel checkerboard shrunk 8x turns grey, not into an aliased pattern."""
        board = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
        Image.fromarray(board).save(tmp_path / "board.png")
        img, _ = load_image(str(tmp_path / "board.png"), image_size=8)
        assert np.abs(img.astype(int) - 127.5).max() < 12

    def test_exif_orientation_applied(self, tmp_path):
        tall = np.zeros((30, 20, 3), dtype=np.uint8)
        tall[:10] = RED  # red on top as stored
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to display"
        Image.fromarray(tall).save(tmp_path / "rot.jpg", exif=exif, quality=95)
        img, _ = load_image(str(tmp_path / "rot.jpg"), image_size=20)
        # Displayed, the image is 30 wide x 20 high with red on the right: the centre crop
        # keeps columns 5..25, so red fills the rightmost quarter.
        assert np.abs(img[:, -3:].astype(int) - RED).max() < 40
        assert img[:, :8].max() < 40

    def test_corrupt_file_names_path(self, lfw):
        bad = lfw / "alice" / "alice_0005.jpg"
        bad.write_bytes(b"\xff\xd8 this is not really a jpeg" * 10)
        with pytest.raises(DataError, match=f"cannot decode image {bad}"):
            load_image(str(bad), image_size=16)
        with pytest.raises(DataError, match=str(bad)):
            load_images([self._path(lfw, "bob", "bob_0001.jpeg"), str(bad)], image_size=16)

    def test_truncated_file_names_path(self, lfw):
        good = (lfw / "bob" / "bob_0001.jpeg").read_bytes()
        cut = lfw / "bob" / "cut.jpeg"
        cut.write_bytes(good[: len(good) // 2])
        with pytest.raises(DataError, match=str(cut)):
            load_image(str(cut), image_size=16)

    def test_missing_file_names_path(self, lfw):
        gone = lfw / "alice" / "gone.jpg"
        with pytest.raises(DataError, match=f"{gone} does not exist"):
            load_image(str(gone), image_size=16)

    def test_load_images_stacks_in_order(self, lfw):
        listing = list_image_folder(str(lfw))
        paths = [r.path for r in listing.records]
        images, found, no_face = load_images(paths, image_size=10)
        assert images.shape == (len(paths), 10, 10, 3) and images.dtype == np.uint8
        assert found.dtype == bool and found.all() and no_face == 0
        np.testing.assert_array_equal(images[3], load_image(paths[3], image_size=10)[0])

    def test_load_images_empty(self):
        images, found, no_face = load_images([], image_size=10)
        assert images.shape == (0, 10, 10, 3) and found.shape == (0,) and no_face == 0


class TestFaceAligner:
    @pytest.fixture(scope="class")
    def aligner(self):
        return FaceAligner(image_size=48)

    def test_face_found_on_synthetic_face(self, aligner):
        face = render_identity_images(0, [0], image_size=160, seed=0, difficulty=0.0)[0]
        out, found = aligner(Image.fromarray(face))
        assert out.shape == (48, 48, 3) and out.dtype == np.uint8
        assert found is True
        # The crop zooms in on the face: it is not the plain centre crop of the whole picture.
        plain = np.asarray(Image.fromarray(face).resize((48, 48), Image.BILINEAR))
        assert np.abs(out.astype(int) - plain).mean() > 10

    def test_no_face_falls_back_to_centre_crop(self, aligner):
        grey = Image.new("RGB", (90, 60), (128, 128, 128))
        out, found = aligner(grey)
        assert found is False
        assert out.shape == (48, 48, 3) and (out == 128).all()

    def test_tiny_image_is_no_face(self, aligner):
        out, found = aligner(Image.new("L", (10, 10), 50))
        assert found is False and out.shape == (48, 48, 3) and (out == 50).all()

    def test_pickles_without_network(self, aligner):
        aligner.mtcnn  # build it
        clone = pickle.loads(pickle.dumps(aligner))
        assert clone._mtcnn is None and clone.image_size == 48 and clone.margin == 14

    def test_load_images_counts_no_face(self, tmp_path, aligner):
        face = render_identity_images(0, [0], image_size=160, seed=0, difficulty=0.0)[0]
        Image.fromarray(face).save(tmp_path / "face.png")
        Image.new("RGB", (64, 64), (128, 128, 128)).save(tmp_path / "grey.png")
        paths = [str(tmp_path / "face.png"), str(tmp_path / "grey.png"), str(tmp_path / "grey.png")]
        images, found, no_face = load_images(paths, image_size=48, align=True, aligner=aligner)
        assert images.shape == (3, 48, 48, 3)
        np.testing.assert_array_equal(found, [True, False, False])
        assert no_face == 2
        single, ok = load_image(paths[0], image_size=48, align=True, mtcnn=aligner)
        assert ok and np.array_equal(single, images[0])


class TestS3:
    """The same folder through a real S3 endpoint (moto's server) and pyarrow's S3 client."""

    @pytest.fixture()
    def s3(self, s3_server, lfw):
        import uuid

        import boto3
        import pyarrow.fs as pafs

        bucket = f"lfw-{uuid.uuid4().hex[:10]}"
        client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        for dirpath, _, files in os.walk(lfw):
            for name in files:
                full = os.path.join(dirpath, name)
                client.upload_file(full, bucket, "data/lfw/" + os.path.relpath(full, lfw))
        client.put_object(Bucket=bucket, Key="data/empty/dave/", Body=b"")  # a folder marker
        client.put_object(Bucket=bucket, Key="data/empty/erin/erin_0001.png",
                          Body=(lfw / "carol" / "carol_0001.png").read_bytes())
        fs = pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", access_key="testing",
                               secret_key="testing", region="us-east-1")
        return bucket, fs

    def test_listing_and_loading_match_local(self, s3, lfw):
        bucket, fs = s3
        remote = list_image_folder(f"s3://{bucket}/data/lfw", filesystem=fs)
        local = list_image_folder(str(lfw))
        assert remote.classes == local.classes
        assert [r.path for r in remote.records][0] == f"s3://{bucket}/data/lfw/alice/alice_0001.jpg"
        assert [(r.identity, os.path.basename(r.path), r.label) for r in remote.records] == \
               [(r.identity, os.path.basename(r.path), r.label) for r in local.records]
        a, _, _ = load_images([r.path for r in remote.records], image_size=16, filesystem=fs)
        b, _, _ = load_images([r.path for r in local.records], image_size=16)
        np.testing.assert_array_equal(a, b)

    def test_missing_prefix_and_key(self, s3):
        bucket, fs = s3
        with pytest.raises(DataError, match=f"s3://{bucket}/nothing/here does not exist"):
            list_image_folder(f"s3://{bucket}/nothing/here", filesystem=fs)
        with pytest.raises(DataError, match=f"s3://{bucket}/data/lfw/alice/nope.jpg does not exist"):
            load_image(f"s3://{bucket}/data/lfw/alice/nope.jpg", image_size=8, filesystem=fs)

    def test_empty_folder_marker(self, s3):
        bucket, fs = s3
        with pytest.raises(DataError, match=f"s3://{bucket}/data/empty/dave is empty"):
            list_image_folder(f"s3://{bucket}/data/empty", filesystem=fs)

    def test_unreachable_endpoint_is_storage_error(self):
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override="http://127.0.0.1:9", scheme="http", access_key="x",
                               secret_key="x", region="us-east-1", connect_timeout=0.5, request_timeout=0.5,
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        with pytest.raises(StorageError, match="s3://bucket/lfw"):
            list_image_folder("s3://bucket/lfw", filesystem=fs)
