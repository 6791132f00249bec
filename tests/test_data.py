"""fastdcgan.data: synthetic faces, image folders, the cache, and the trainer's batch source."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import fastdcgan.data as data
from fastdcgan.data import EpochBatches, ImageFolderFaces, SyntheticFaces, folder, synthetic, to_float


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test caches under its own tmp dir, never in the user's cache."""
    d = tmp_path / "cache"
    monkeypatch.setenv("FASTDCGAN_CACHE", str(d))
    return d


def boom(*args, **kwargs):
    raise AssertionError("unexpected call")


# ---------------------------------------------------------------- synthetic faces

def test_render_deterministic_and_prefix():
    a = synthetic.render_faces(260, 64, seed=0)  # crosses a chunk boundary
    assert a.shape == (260, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, synthetic.render_faces(260, 64, seed=0))
    assert np.array_equal(a[:40], synthetic.render_faces(40, 64, seed=0))
    assert np.array_equal(a[:257], synthetic.render_faces(257, 64, seed=0))
    other = synthetic.render_faces(40, 64, seed=1)
    assert all(not np.array_equal(x, y) for x, y in zip(a[:40], other))


def test_synthetic_dataset_api(cache):
    ds = SyntheticFaces(n=48, size=32, seed=5)
    assert ds.images.shape == (48, 32, 32, 3) and ds.images.dtype == torch.uint8 and ds.images.device.type == "cpu"
    assert len(ds) == 48
    x = ds[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert -1 <= x.min() < x.max() <= 1
    assert torch.equal(x, ds.images[3].permute(2, 0, 1).float() * (1 / 127.5) - 1)
    assert ds.cache_path.parent == cache and ds.cache_path.exists()
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_synthetic_images_are_varied():
    x = synthetic.render_faces(128, 64, seed=2).astype(np.float32)
    flat = x.reshape(len(x), -1)
    assert (flat.std(1) > 12).all() and np.median(flat.std(1)) > 35  # real contrast, no flat blobs
    assert len({im.tobytes() for im in x.astype(np.uint8)}) == len(x)
    # images differ a lot from each other: mean absolute difference between random pairs
    assert np.abs(flat[:64] - flat[64:]).mean() > 30
    assert x.std(0).mean() > 40  # pixelwise spread across the set
    # colours vary: per-image mean colour spreads in every channel
    assert (x.mean((1, 2)).std(0) > 12).all()
    # the centre (the face) and the border (background) differ: faces are not backgrounds
    centre, border = x[:, 24:40, 24:40].mean((1, 2)), x[:, :4].mean((1, 2))
    assert np.abs(centre - border).sum(1).mean() > 40


def test_synthetic_cache_hit_and_key(monkeypatch, cache):
    first = SyntheticFaces(n=20, seed=7)
    monkeypatch.setattr(synthetic, "render_faces", boom)
    again = SyntheticFaces(n=20, seed=7)
    assert torch.equal(first.images, again.images)
    with pytest.raises(AssertionError, match="unexpected call"):  # another seed is another cache entry
        SyntheticFaces(n=20, seed=8)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTDCGAN_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert data.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("FASTDCGAN_CACHE")
    assert data.cache_dir() == tmp_path / "x" / "fastdcgan"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "fastdcgan"


def test_corrupt_cache_is_rebuilt(cache):
    ds = SyntheticFaces(n=10)
    ds.cache_path.write_bytes(b"not a numpy file")
    assert torch.equal(SyntheticFaces(n=10).images, ds.images)


# ---------------------------------------------------------------- image folders

def rand_image(rng, w, h, mode="RGB"):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.fixture
def tree(tmp_path):
    """A small tree of images of several sizes, formats and modes, plus a non-image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "b" / "d").mkdir(parents=True)
    rand_image(rng, 80, 60).save(root / "a.png")
    rand_image(rng, 50, 90).save(root / "b" / "c.JPG", quality=90)
    rand_image(rng, 70, 70, "P").save(root / "b" / "d" / "e.png")
    rand_image(rng, 64, 64, "L").save(root / "f.bmp")
    rand_image(rng, 100, 120, "RGBA").save(root / "g.webp")
    rand_image(rng, 40, 48, "CMYK").save(root / "h.jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


NAMES = ["a.png", "b/c.JPG", "b/d/e.png", "f.bmp", "g.webp", "h.jpeg"]


def reference(path, size, crop=None):
    """The transform written out directly with PIL."""
    im = Image.open(path).convert("RGB")
    if crop:
        w, h = im.size
        l, t = round((w - crop) / 2), round((h - crop) / 2)
        im = im.crop((l, t, l + crop, t + crop))
    w, h = im.size
    if min(w, h) != size:
        im = im.resize((size, int(size * h / w)) if w <= h else (int(size * w / h), size), Image.BILINEAR)
    w, h = im.size
    l, t = round((w - size) / 2), round((h - size) / 2)
    return np.asarray(im.crop((l, t, l + size, t + size)))


def test_folder_reads_every_format_in_order(tree, monkeypatch):
    monkeypatch.setattr(folder, "_pool_context", boom)  # workers=1 decodes in this process
    ds = ImageFolderFaces(tree, size=32, workers=1)
    assert ds.images.shape == (len(NAMES), 32, 32, 3) and ds.images.dtype == torch.uint8
    for i, name in enumerate(NAMES):  # sorted relative paths, nested dirs included
        assert np.array_equal(ds.images[i].numpy(), reference(tree / name, 32)), name
    assert ds[0].shape == (3, 32, 32) and -1 <= ds[0].min() and ds[0].max() <= 1


def test_folder_resize_and_centre_crop_match_pil(tree):
    ds = ImageFolderFaces(tree, size=24, workers=1)
    # b/c.JPG is 50x90: short side to 24 -> 24x43, centre crop rows 10..34 (torchvision rounding)
    im = Image.open(tree / "b" / "c.JPG").convert("RGB").resize((24, 43), Image.BILINEAR).crop((0, 10, 24, 34))
    assert np.array_equal(ds.images[1].numpy(), np.asarray(im))


def test_folder_celeba_crop(tmp_path):
    root = tmp_path / "celeba"
    root.mkdir()
    rand_image(np.random.default_rng(1), 178, 218).save(root / "000001.png")
    expected = np.asarray(Image.open(root / "000001.png").crop((35, 55, 143, 163)).resize((64, 64), Image.BILINEAR))
    assert np.array_equal(ImageFolderFaces(root, crop="celeba", workers=1).images[0].numpy(), expected)
    assert np.array_equal(ImageFolderFaces(root, crop=108, workers=1).images[0].numpy(), expected)
    assert np.array_equal(ImageFolderFaces(root, size=32, crop=100, workers=1).images[0].numpy(),
                          reference(root / "000001.png", 32, crop=100))


def test_folder_parallel_matches_serial(tree, tmp_path):
    serial = ImageFolderFaces(tree, size=16, workers=1)
    parallel = ImageFolderFaces(tree, size=16, workers=2, cache_dir=tmp_path / "other")
    assert torch.equal(serial.images, parallel.images)


def test_folder_skips_corrupt_files_with_one_warning(tree):
    (tree / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    good = (tree / "a.png").read_bytes()
    (tree / "b" / "truncated.png").write_bytes(good[:len(good) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderFaces(tree, size=16, workers=1)
    assert len(ds) == len(NAMES)
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1 and "skipped 2 " in msgs[0] and "bad.jpg" in msgs[0]


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderFaces(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_dataset(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty"):
        ImageFolderFaces(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken"):
        ImageFolderFaces(broken, workers=1)
    with pytest.raises(ValueError, match="crop"):
        ImageFolderFaces(broken, crop="square")


def test_folder_cache_reuse_and_invalidation(tree, monkeypatch):
    first = ImageFolderFaces(tree, size=16, workers=1)
    monkeypatch.setattr(folder, "_decode", boom)
    assert torch.equal(ImageFolderFaces(tree, size=16, workers=1).images, first.images)
    with pytest.raises(AssertionError, match="unexpected call"):  # another size is another entry
        ImageFolderFaces(tree, size=20, workers=1)
    rand_image(np.random.default_rng(3), 30, 30).save(tree / "b" / "new.png")
    with pytest.raises(AssertionError, match="unexpected call"):  # the folder changed
        ImageFolderFaces(tree, size=16, workers=1)
    monkeypatch.undo()
    assert len(ImageFolderFaces(tree, size=16, workers=1)) == len(NAMES) + 1


# ---------------------------------------------------------------- batches

def test_to_float():
    x = torch.tensor([0, 255, 128, 1], dtype=torch.uint8).reshape(1, 2, 2, 1).expand(2, 2, 2, 3)
    y = to_float(x)
    assert y.shape == (2, 3, 2, 2) and y.dtype == torch.float32 and y.is_contiguous()
    assert torch.equal(y[0, 0].flatten(), torch.tensor([0, 255, 128, 1]).float() / 127.5 - 1)
    assert y.min() == -1 and y.max() == 1
    with pytest.raises(ValueError):
        to_float(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))


@pytest.fixture
def images():
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8))


def take(b, k):
    return [b.next_batch() for _ in range(k)]


def test_batches_follow_the_epoch_permutation(images):
    b = EpochBatches(images, 8, seed=3)
    assert b.steps_per_epoch == len(b) == 6
    for epoch in range(2):
        perm = torch.randperm(50, generator=torch.Generator().manual_seed(3 + epoch))
        for step in range(6):
            assert b.epoch == epoch
            assert torch.equal(b.indices(), perm[step * 8:(step + 1) * 8])
            x = b.next_batch()
            assert x.shape == (8, 3, 8, 8) and x.dtype == torch.float32
            assert -1 <= x.min() and x.max() <= 1
            assert torch.equal(x, to_float(images[perm[step * 8:(step + 1) * 8]]))
    assert b.epoch == 2
    same, other = EpochBatches(images, 8, seed=3), EpochBatches(images, 8, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(take(same, 7), take(EpochBatches(images, 8, seed=3), 7)))
    assert not torch.equal(same.next_batch(), other.next_batch())


def test_rank_shards_are_disjoint_and_cover_the_global_batch(images):
    world = [EpochBatches(images, 4, seed=1, rank=r, world_size=3) for r in range(3)]
    single = EpochBatches(images, 12, seed=1)
    assert world[0].steps_per_epoch == single.steps_per_epoch == 4
    for _ in range(6):  # across an epoch boundary
        shards = [b.indices() for b in world]
        assert len(set(torch.cat(shards).tolist())) == 12
        assert torch.equal(torch.cat(shards), single.indices())
        for b in world:
            b.next_batch()
        single.next_batch()


def test_state_dict_resume(images):
    b = EpochBatches(images, 8, seed=9)
    take(b, 4)
    state = b.state_dict()
    expected = take(b, 5)  # crosses into epoch 1
    resumed = EpochBatches(images, 8, seed=9)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (0, 4)
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 5), expected))
    with pytest.raises(ValueError):
        EpochBatches(images, 10, seed=9).load_state_dict(state)


def test_keep_last_and_batch_size_checks(images):
    b = EpochBatches(images, 16, drop_last=False)
    order = []
    while b.epoch == 0:
        order.append(b.indices())
        b.next_batch()
    assert [len(i) for i in order] == [16, 16, 16, 2]
    assert sorted(torch.cat(order).tolist()) == list(range(50))  # every image once
    ranks = [EpochBatches(images, 16, drop_last=False, rank=r, world_size=3) for r in range(3)]
    assert ranks[0].steps_per_epoch == 2
    for r in ranks:
        r.next_batch()
    tail = [r.indices() for r in ranks]  # 2 left after a global batch of 48: padded to 3, one each
    assert [len(t) for t in tail] == [1, 1, 1]
    with pytest.raises(ValueError, match="larger than the dataset"):
        EpochBatches(images, 51)
    with pytest.raises(ValueError, match="world size"):
        EpochBatches(images, 20, world_size=3)


def test_load_dataset(tree):
    # the trainer passes every option whatever the kind; the other kind's are ignored
    assert isinstance(data.load_dataset("synthetic", size=32, n=8, crop=None), SyntheticFaces)
    ds = data.load_dataset(tree, size=16, workers=1, crop=None, n=20000)
    assert isinstance(ds, ImageFolderFaces) and len(ds) == len(NAMES)


@pytest.mark.parametrize("shape, batch", [((40, 64, 64, 3), 7), ((9, 5, 3, 3), 4)])  # odd: 45 bytes
def test_gather_normalize_kernel_matches_eager(shape, batch):
    """The trainer's fused gather (Triton; interpreter on CPU) is bit-identical to index_select +
    to_float, in channels_last layout, for every uint8 value and odd image sizes."""
    from fastdcgan.data._common import U8_TO_UNIT
    from fastdcgan.kernels.gather import gather_normalize

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(dev)
    first = images[0].view(-1)   # every uint8 value appears (the first image is big enough)
    first[:256] = torch.arange(min(256, first.numel()), dtype=torch.uint8, device=dev)
    idx = torch.randint(0, shape[0], (batch,), generator=g).to(dev)
    idx[0] = 0
    out = gather_normalize(images, idx, U8_TO_UNIT, -1.0)
    assert out.shape == (batch, shape[3], shape[1], shape[2])
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, to_float(images.index_select(0, idx)))
    # a bf16 step's batch: the fp32 values rounded once, as .to(torch.bfloat16) would
    out16 = gather_normalize(images, idx, U8_TO_UNIT, -1.0, torch.bfloat16)
    assert out16.dtype == torch.bfloat16 and out16.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out16, out.to(torch.bfloat16))
