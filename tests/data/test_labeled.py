"""Labeled data for fine-tuning: prepare keeps the classes, build_classification_loader (labels, sharding, resuming,
the official transforms, random erasing) and its one-line errors."""

import io
import json
import math
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast import prepare as prep
from mae_fast.config import AugConfig, DataConfig
from mae_fast.data import build_classification_loader, build_loader, dali_unavailable_reason
from mae_fast.data.shards import load_shard_set, stream_images
from mae_fast.data.files import class_folder_images
from mae_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SeededErasing, eval_resize_size
from mae_fast.errors import ConfigError, DataError
from image_files import color_number, number_color

#: Created in this order; sorted (as torchvision's ImageFolder sorts them) they are Mole, ant, zebra.
CLASS_NAMES = ("zebra", "Mole", "ant")
SORTED_CLASSES = ["Mole", "ant", "zebra"]


def write_labeled(root, per_class=(4, 3, 4), split="train", first=0):
    """``root/split/<class>/`` of solid images, image ``n`` (counted over the classes from ``first``) of
    :func:`number_color`, 40 to 48 px; returns {n: class name}."""
    classes, n = {}, first
    for name, count in zip(CLASS_NAMES, per_class):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            Image.new("RGB", (40 + 2 * (n % 5), 48 - (n % 3) * 4), number_color(n)).save(folder / f"im{n:03d}.png")
            classes[n] = name
            n += 1
    return classes


def denormalize(images):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return images.cpu().float() * std + mean


def loader(path, train, rank=0, world=1, val_path=None, aug=None, batch=4, size=32, seed=0, backend="torch",
           workers=0):
    cfg = DataConfig(data_path=str(path), val_path=None if val_path is None else str(val_path), backend=backend,
                     input_size=size, batch_size=batch, num_workers=workers)
    return build_classification_loader(cfg, aug, rank, world, "cpu", seed, train)


def prepared(tmp_path, source):
    dst = tmp_path / "shards"
    prep.prepare(str(source), str(dst), max_side=64, shard_size=3_000, workers=1)
    return dst


def shard_classes_by_index(dst) -> list[int]:
    """Each sample's cls value in the shard set's own order, read with tarfile (not with mae_fast's reader)."""
    manifest = json.loads((dst / "manifest.json").read_text())
    values = []
    for record in manifest["shards"]:
        with tarfile.open(dst / record["name"]) as tar:
            values += [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
    return values


# ------------------------------------------------------------------------------------------------ prepare


def test_prepare_writes_each_images_class_and_the_class_names(tmp_path):
    source = tmp_path / "src"
    classes_of = write_labeled(source)
    dst = prepared(tmp_path, source)
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["classes"] == SORTED_CLASSES
    assert len(manifest["shards"]) >= 2
    seen = []
    for record in manifest["shards"]:
        path = dst / record["name"]
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        samples = {}
        for member in members:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = member
        assert all(set(members) == {"jpg", "cls"} for members in samples.values())
        # The reader gives each image its cls text: by the index file, and from a tar stream (a command's output).
        for images in (list(stream_images(str(path), labels=True)), list(stream_images(f"pipe:cat {path}",
                                                                                           labels=True))):
            assert len(images) == record["count"]
            for image in images:
                number = color_number(Image.open(io.BytesIO(image.data)).convert("RGB").getpixel((20, 20)))
                assert image.cls == str(SORTED_CLASSES.index(classes_of[number]))
        seen += [color_number(Image.open(io.BytesIO(image.data)).convert("RGB").getpixel((20, 20)))
                 for image in stream_images(str(path))]
    assert sorted(seen) == sorted(classes_of)
    assert load_shard_set(str(dst)).classes == SORTED_CLASSES


def test_a_cls_member_before_its_image_is_read_too(tmp_path):
    # Other tools write a sample's members in name order: .cls before .jpg.
    path = tmp_path / "shard-000000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            for name, data in ((f"s{i}.cls", str(2 - i).encode()), (f"s{i}.jpg", b"\xff\xd8\xff" + bytes(8))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert [image.cls for image in stream_images(str(path), labels=True)] == ["2", "1", "0"]
    assert [image.cls for image in stream_images(str(path), skip=1, labels=True)] == ["1", "0"]
    assert [image.cls for image in stream_images(str(path))] == [None, None, None]  # not read unless asked


def test_a_flat_folder_gets_no_classes_and_old_manifests_still_load_for_pretraining(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 44), number_color(i)).save(flat / f"im{i}.png")
    dst = tmp_path / "flat_shards"
    prep.prepare(str(flat), str(dst), max_side=64, shard_size=3_000, workers=1)
    manifest = json.loads((dst / "manifest.json").read_text())
    assert "classes" not in manifest
    for record in manifest["shards"]:
        with tarfile.open(dst / record["name"]) as tar:
            assert all(name.endswith(".jpg") for name in tar.getnames())

    # A labeled set whose manifest predates the classes (no "classes" key) still pretrains, and its cls values
    # still label it for fine-tuning, as "0" .. "n-1".
    source = tmp_path / "src"
    write_labeled(source)
    labeled = prepared(tmp_path, source)
    manifest = json.loads((labeled / "manifest.json").read_text())
    del manifest["classes"]
    (labeled / "manifest.json").write_text(json.dumps(manifest))
    assert load_shard_set(str(labeled)).classes is None
    for path in (dst, labeled):
        cfg = DataConfig(data_path=str(path), backend="torch", input_size=16, batch_size=4, num_workers=0)
        pretraining = build_loader(cfg, 0, 1, "cpu", 0)
        batches = list(pretraining.epoch(0))
        assert all(len(batch) == 2 for batch in batches)  # (images, indices), as before
        assert sorted(i for _, idx in batches for i in idx.tolist() if i >= 0) == list(range(pretraining.num_samples))
    assert loader(labeled, train=True).classes == ["0", "1", "2"]
    # Preparing the source again into that folder is refused rather than mixed with shards without classes.
    with pytest.raises(ConfigError, match="without its classes") as exc:
        prep.prepare(str(source), str(labeled), max_side=64, shard_size=3_000, workers=1)
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------------------------------------ loaders


def labeled_source(tmp_path, kind):
    """A training source (a folder with train/ and val/, or the shard set prepared from its train/), and a function
    giving a dataset index's class name."""
    folder = tmp_path / "set"
    write_labeled(folder)
    write_labeled(folder, split="val")
    if kind == "folder":
        return folder, lambda ld, index: ld.files[index].split("/")[-2]
    dst = prepared(tmp_path, folder / "train")
    values = shard_classes_by_index(dst)
    return dst, lambda ld, index: SORTED_CLASSES[values[index]]


SOURCES = ["folder", "shards"]
needs_dali = pytest.mark.skipif(dali_unavailable_reason() is not None, reason=str(dali_unavailable_reason()))
BACKENDS = ["torch", pytest.param("dali", marks=needs_dali)]
#: DALI's training pipeline without RandAugment and erasing: built in a fraction of a second, for the tests of what
#: does not depend on the augmentation (RandAugment's pipeline takes seconds to define on a CPU).
PLAIN = AugConfig(aa="none", reprob=0.0)


def test_classes_are_numbered_as_torchvision_image_folder_numbers_them(tmp_path):
    from torchvision.datasets import ImageFolder

    write_labeled(tmp_path, per_class=(2, 1, 3))
    reference = ImageFolder(str(tmp_path / "train"))
    files, labels, classes = class_folder_images(tmp_path, "train")
    assert classes == reference.classes == SORTED_CLASSES
    assert list(zip(files, labels.tolist())) == reference.samples
    ld = loader(tmp_path, True)
    assert ld.classes == reference.classes and ld.num_classes == 3
    assert ld.backend == "torch" and ld.num_samples == 6 and len(ld) == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", SOURCES)
def test_two_ranks_get_every_image_once_with_its_class(tmp_path, kind, backend):
    path, class_of = labeled_source(tmp_path, kind)
    aug = PLAIN if backend == "dali" else None
    for train in (True, False):
        val_path = path if (kind == "shards" and not train) else None
        seen, steps, marked = [], set(), 0
        for rank in range(2):
            ld = loader(path, train, rank=rank, world=2, val_path=val_path, backend=backend, aug=aug)
            assert ld.classes == SORTED_CLASSES and ld.backend == backend and ld.num_samples == 11
            steps.add(len(ld))
            for images, labels, indices in ld.epoch(1):
                assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
                assert labels.dtype == torch.int64 and indices.dtype == torch.int64 and labels.shape == (4,)
                assert labels.device == images.device and indices.device.type == "cpu"
                assert ((labels >= 0) & (labels < 3)).all()  # marked slots too: a loss never indexes out of range
                colors = denormalize(images).mean(dim=(2, 3))
                for color, label, index in zip(colors, labels.tolist(), indices.tolist()):
                    if index < 0:
                        marked += 1
                        continue
                    assert ld.classes[label] == class_of(ld, index)
                    if not train:  # resize and center crop keep a solid image's color: the pixels are that image's
                        number = color_number(color.tolist())
                        assert 0 <= number < 11
                    seen.append(index)
        assert steps == {2}  # the same number of steps on each rank: 11 images in 2 ranks x 2 batches of 4
        assert sorted(seen) == list(range(11))  # every image once per epoch over the ranks
        assert marked == 2 * 2 * 4 - 11  # the padding, marked


@pytest.mark.parametrize("kind", SOURCES)
def test_the_validation_split_over_ranks_gives_the_one_rank_images_and_labels(tmp_path, kind):
    path, _ = labeled_source(tmp_path, kind)
    val_path = path if kind == "shards" else None

    def delivered(world):
        out = {}
        for rank in range(world):
            ld = loader(path, False, rank=rank, world=world, val_path=val_path, batch=3)
            for images, labels, indices in ld.epoch(0):
                for image, label, index in zip(images, labels.tolist(), indices.tolist()):
                    if index >= 0:
                        assert index not in out
                        out[index] = (image, label)
        return out

    one, two = delivered(1), delivered(2)
    assert sorted(one) == sorted(two) == list(range(11))
    for index in one:
        assert torch.equal(one[index][0], two[index][0]) and one[index][1] == two[index][1]


@pytest.mark.parametrize("kind", SOURCES)
def test_the_same_seed_gives_the_same_batches_and_a_restart_mid_epoch_too(tmp_path, kind):
    path, _ = labeled_source(tmp_path, kind)
    aug = AugConfig(reprob=1.0)  # the official RandAugment, and an erased box in every image
    full = list(loader(path, True, aug=aug).epoch(2))
    again = list(loader(path, True, aug=aug, workers=2).epoch(2))  # whichever worker decodes which image
    rest = list(loader(path, True, aug=aug).epoch(2, start=1))  # built anew, as a resumed run does
    assert len(full) == 3 and len(rest) == 2
    for (images, labels, indices), (images2, labels2, indices2) in zip(full, again):
        assert torch.equal(images, images2) and torch.equal(labels, labels2) and torch.equal(indices, indices2)
    for (images, labels, indices), (images2, labels2, indices2) in zip(full[1:], rest):
        assert torch.equal(images, images2) and torch.equal(labels, labels2) and torch.equal(indices, indices2)
    other_epoch = list(loader(path, True, aug=aug).epoch(3))
    other_seed = list(loader(path, True, aug=aug, seed=1).epoch(2))
    assert not torch.equal(full[1][0], other_epoch[1][0])  # a new epoch draws anew
    assert not torch.equal(full[1][0], other_seed[1][0])  # and so does another seed


@needs_dali
def test_dali_gives_the_same_batches_for_a_seed_and_after_a_restart_mid_epoch(tmp_path):
    # The official recipe on DALI (RandAugment, and pixel erasing in every image): every draw follows the slot's
    # seed, so a loader built anew, as a resumed run builds it, gives the rest of the epoch pixel for pixel.
    path, class_of = labeled_source(tmp_path, "folder")
    aug = AugConfig(reprob=1.0)
    ld = loader(path, True, aug=aug, backend="dali")
    full = list(ld.epoch(2))
    rest = list(loader(path, True, aug=aug, backend="dali").epoch(2, start=1))
    assert len(full) == 3 and len(rest) == 2
    for (images, labels, indices), (images2, labels2, indices2) in zip(full[1:], rest):
        assert torch.equal(images, images2) and torch.equal(labels, labels2) and torch.equal(indices, indices2)
    for _, labels, indices in full:
        assert all(ld.classes[c] == class_of(ld, i) for c, i in zip(labels.tolist(), indices.tolist()) if i >= 0)
    other_epoch = list(ld.epoch(3))
    assert not torch.equal(full[1][0], other_epoch[1][0])  # a new epoch draws anew
    assert ld.inner.builds == 1  # one pipeline for the run


def write_textured(folder, sizes):
    """Smooth but varied images (gradients and a slow wave), one per size, so resampling and crop offsets show."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (width, height) in enumerate(sizes):
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
        rgb = np.stack([xx * 255 / (width - 1), yy * 255 / (height - 1),
                        127.5 + 100 * np.sin(xx / 4 + yy / 5 + i)], axis=-1)
        Image.fromarray(rgb.round().astype(np.uint8), "RGB").save(folder / f"t{i}.png")


def official_eval(size):
    """The official evaluation transform, main_finetune.py's build_transform(is_train=False) as written there."""
    from torchvision import transforms

    crop_pct = 224 / 256 if size <= 224 else 1.0
    return transforms.Compose([
        transforms.Resize(int(size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_eval_transform_is_the_official_resize_and_center_crop(tmp_path, backend):
    assert [eval_resize_size(s) for s in (32, 224, 384)] == [36, 256, 384]
    sizes = [(40, 48), (48, 40), (45, 45), (47, 41), (36, 90), (200, 150)]
    for split in ("train", "val"):
        write_textured(tmp_path / split / "only", sizes)
    ld = loader(tmp_path, False, batch=2, backend=backend)
    official = official_eval(32)
    # torch: Pillow's resize, so float rounding only. DALI: the same sizes and offsets (a pixel off would be tens of
    # levels on these images), its own bicubic resampling within one level of Pillow's.
    level = 1 / 255 / min(IMAGENET_STD)
    checked = 0
    for images, labels, indices in ld.epoch(0):
        for image, index in zip(images, indices.tolist()):
            if index < 0:
                continue
            expected = official(Image.open(ld.files[index]).convert("RGB"))
            assert image.shape == expected.shape
            difference = (image - expected).abs()
            if backend == "torch":
                assert difference.max().item() < 1e-5, ld.files[index]
            else:
                assert difference.max().item() < 1.01 * level and difference.mean().item() < 0.2 * level
            checked += 1
    assert checked == len(sizes)


def test_the_training_transform_is_the_official_one(tmp_path):
    from timm.data import auto_augment, create_transform
    from timm.data.random_erasing import RandomErasing

    write_labeled(tmp_path)
    aug = AugConfig(aa="rand-m7-n3-mstd0.5-inc1", reprob=0.4, remode="rand", recount=2)
    ld = loader(tmp_path, True, aug=aug)
    transform = ld.inner.loader.dataset.transform
    erasing = ld.erasing.erasing
    # The official build_transform(is_train=True), built as main_finetune.py builds it (not split).
    official = create_transform(32, is_training=True, color_jitter=aug.color_jitter, auto_augment=aug.aa,
                                interpolation="bicubic", re_prob=aug.reprob, re_mode=aug.remode,
                                re_count=aug.recount, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    ours = [*transform.primary.transforms, *transform.secondary.transforms]
    assert [repr(t) for t in official.transforms] == [repr(t) for t in ours] + [
        "MaybeToTensor()", repr(official.transforms[-2]), repr(erasing)]
    crop, flip, rand_augment = ours
    assert crop.scale == (0.08, 1.0) and crop.ratio == (3 / 4, 4 / 3) and crop.size == (32, 32)
    assert flip.p == 0.5
    assert rand_augment.num_layers == 3 and {op.magnitude for op in rand_augment.ops} == {7}
    assert {op.magnitude_std for op in rand_augment.ops} == {0.5}
    assert [op.name for op in rand_augment.ops] == auto_augment._RAND_INCREASING_TRANSFORMS  # -inc1
    assert isinstance(erasing, RandomErasing)
    assert (erasing.probability, erasing.mode, erasing.min_count, erasing.max_count) == (0.4, "rand", 1, 2)
    assert (erasing.min_area, erasing.max_area, erasing.num_splits) == (0.02, 1 / 3, 0)

    # The split is at ToTensor: the workers' uint8 pixels, then normalization on the device, equal timm's
    # ToTensor and Normalize on the same augmented image.
    plain = loader(tmp_path, True, aug=AugConfig(reprob=0.0))
    images, _, indices = next(iter(plain.epoch(0)))
    seeds = plain.inner.slot_seeds(0)[:4]
    tensor_normalize = official.transforms[-3:-1]
    for image, index, seed in zip(images, indices.tolist(), seeds.tolist()):
        pixels = plain.inner.loader.dataset.transform(Image.open(plain.files[index]).convert("RGB"), seed)
        reference = tensor_normalize[1](tensor_normalize[0](Image.fromarray(pixels.permute(1, 2, 0).numpy())))
        assert (image - reference).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_erasing_erases_with_the_configured_probability(tmp_path, backend):
    # Solid images with no RandAugment: a slot shows pixels off its color only where it was erased.
    write_labeled(tmp_path, per_class=(4, 4, 4))
    probability = 0.4
    ld = loader(tmp_path, True, aug=AugConfig(aa="none", reprob=probability), backend=backend)
    erased, areas, slots = 0, [], 0
    for epoch in range(16):
        for images, _, indices in ld.epoch(epoch):
            for image, index in zip(images, indices.tolist()):
                pixels = denormalize(image[None])[0]
                solid = pixels.median(dim=2).values.median(dim=1).values  # the image's own color
                off = ((pixels - solid.view(3, 1, 1)).abs() > 12).any(dim=0)
                slots += 1
                if off.any():
                    erased += 1
                    areas.append(off.float().mean().item())
    assert slots == 16 * 12
    p = erased / slots
    assert abs(p - probability) < 4 * math.sqrt(probability * (1 - probability) / slots), p
    # Each box covers 2 % to 1/3 of the image (timm's range); pixel noise within 12 levels of the color hides a few.
    assert min(areas) > 0.02 * 0.7 and max(areas) <= 1 / 3 + 0.01


def test_seeded_erasing_leaves_the_global_generators_as_they_were():
    from timm.data.random_erasing import RandomErasing

    random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), torch.rand(1))
    random.seed(1)
    torch.manual_seed(1)
    SeededErasing(RandomErasing(1.0, mode="pixel", device="cpu"))(torch.zeros(3, 3, 16, 16), [1, 2, 3])
    assert (random.random(), torch.rand(1)) == expected


# ------------------------------------------------------------------------------------------------ bad input


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_data_without_labels_is_refused_in_one_line(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), number_color(i)).save(flat / f"im{i}.png")
    with pytest.raises(DataError, match="--data_path .*has no class sub-folders") as exc:
        loader(flat, True)
    assert str(flat) in one_line(exc)
    shards = tmp_path / "shards"
    prep.prepare(str(flat), str(shards), max_side=64, workers=1)
    with pytest.raises(DataError, match="--data_path .*carry no cls member") as exc:
        loader(shards, True)
    assert str(shards) in one_line(exc)
    with pytest.raises(ConfigError, match="--data_path: is neither an existing folder nor a shard set") as exc:
        loader(tmp_path / "missing", True)
    assert str(tmp_path / "missing") in one_line(exc)


def test_a_missing_val_folder_is_refused_in_one_line(tmp_path):
    write_labeled(tmp_path / "set")
    assert len(list(loader(tmp_path / "set", True).epoch(0))) == 3  # training needs no val/
    with pytest.raises(DataError, match="--data_path .* has no val/ folder .*give --val_path") as exc:
        loader(tmp_path / "set", False)
    assert str(tmp_path / "set") in one_line(exc)
    with pytest.raises(ConfigError, match="--val_path: is neither an existing folder") as exc:
        loader(tmp_path / "set", False, val_path=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in one_line(exc)


def test_a_validation_set_of_other_classes_is_refused_in_one_line(tmp_path):
    write_labeled(tmp_path / "set")
    write_labeled(tmp_path / "set", split="val")
    assert loader(tmp_path / "set", False).classes == SORTED_CLASSES  # <data_path>/val by default
    (tmp_path / "fewer" / "Mole").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(tmp_path / "fewer" / "Mole" / "a.png")
    with pytest.raises(DataError, match="--val_path .* has 1 classes and the training set .* 3") as exc:
        loader(tmp_path / "set", False, val_path=tmp_path / "fewer")
    one_line(exc)
    for name in ("Mole", "ant", "zebu"):
        (tmp_path / "other" / name).mkdir(parents=True)
        Image.new("RGB", (40, 40)).save(tmp_path / "other" / name / "a.png")
    with pytest.raises(DataError, match="class 2 is 'zebu' where the training set .* has 'zebra'") as exc:
        loader(tmp_path / "set", False, val_path=tmp_path / "other")
    one_line(exc)
    shards = prepared(tmp_path, tmp_path / "set" / "train")
    with pytest.raises(ConfigError, match="--val_path") as exc:
        loader(shards, False)
    one_line(exc)
    # A shard set validated by a folder of the same classes: the manifest's names are compared.
    assert loader(shards, False, val_path=tmp_path / "set" / "val").classes == SORTED_CLASSES
    with pytest.raises(DataError, match="class 2 is 'zebu'") as exc:
        loader(shards, False, val_path=tmp_path / "other")


def test_an_aa_policy_timm_cannot_parse_is_refused_in_one_line(tmp_path):
    write_labeled(tmp_path)
    for policy in ("rand-x9", "rand-m9.5", "bogus"):
        with pytest.raises(ConfigError, match=f"--aa: timm cannot parse the policy '{policy}'") as exc:
            loader(tmp_path, True, aug=AugConfig(aa=policy))
        one_line(exc)


def test_synthetic_is_refused_auto_reads_with_torch_and_dali_needs_a_policy_it_runs(tmp_path):
    write_labeled(tmp_path)
    assert loader(tmp_path, True, backend="auto").backend == "torch"  # the official recipe's images
    if dali_unavailable_reason() is None:
        for policy, named in (("original", "Auto"), ("augmix-m5", "AugMix"), ("rand-m9-t3a", "Desaturate")):
            with pytest.raises(ConfigError, match=f"^--aa: .*{named}.*use --data_backend torch") as exc:
                loader(tmp_path, True, backend="dali", aug=AugConfig(aa=policy))
            one_line(exc)
    with pytest.raises(ConfigError, match="--data_backend synthetic") as exc:
        build_classification_loader(DataConfig(backend="synthetic", input_size=16, batch_size=2), None, 0, 1, "cpu",
                                    0, True)
    one_line(exc)


def test_the_official_policy_posterizes_to_zero_bits_as_its_pillow_did():
    # rand-m9-mstd0.5-inc1's increasing posterize keeps 0 bits at the top of its magnitude noise: newer Pillow raises
    # there (a fine-tune stopped after some minutes); the images must come out, black as the official run's were.
    from PIL import Image, ImageOps

    from mae_fast.config import AugConfig
    from mae_fast.data.transforms import official_train_transform, posterize_any_bits

    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert posterize_any_bits(img, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert posterize_any_bits(img, 3).tobytes() == ImageOps.posterize(img, 3).tobytes()
    assert posterize_any_bits(img, 8) is img
    primary, secondary, _ = official_train_transform(32, AugConfig())
    ops = [op for t in secondary.transforms for op in getattr(t, "ops", ())]
    posterize = [op for op in ops if op.name.startswith("Posterize")]
    assert posterize and all(op.aug_fn is posterize_any_bits for op in posterize)
    posterize[0].magnitude, posterize[0].magnitude_std, posterize[0].prob = 10, 0, 1.0  # the 0-bit level
    out = posterize[0](Image.new("RGB", (32, 32), (200, 100, 50)))
    assert out.getextrema() == ((0, 0), (0, 0), (0, 0))
