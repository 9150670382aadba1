"""Training data through 🤗 datasets: the built-in digits, a Hub dataset or a local image folder, as [-1, 1] tensors.

Every loader returns a ``datasets.DatasetDict`` with an image column (and a label or caption column when there is
one); ``image_dataset_to_tensors`` checks the columns and the images and turns a split into a ``torch`` dataset
whose items are ``{"sample": [C, H, W] float tensor in [-1, 1], "class_labels": int}`` (or ``"prompt": str``), the
form the training loop takes. ``RandomFlip`` is the data augmentation of Diffusers' ``--random_flip``, drawn from
the loop's per-micro-batch randomness so that it resumes exactly.
"""

import io
import os

import numpy as np
import torch
from PIL import Image

DIGITS_NUM_CLASSES = 10
DIGITS_TEST_SIZE = 297  # 1797 images: 1500 to train on, 297 held out
DIGITS_SPLIT_SEED = 0
MODE_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4}


def load_digits_dataset():
    """scikit-learn's bundled handwritten digits (1797 8x8 grey images, 10 classes) as a ``DatasetDict``.

    Columns ``image`` (PIL "L", 0..255 from the 0..16 originals) and ``label`` (``ClassLabel``); the ``test``
    split is a fixed held-out set of 297 images (stratified by label, seed 0), the same on every machine.
    """
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(DIGITS_NUM_CLASSES)])}
    )
    dataset = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in pixels], "label": digits.target.tolist()}, features=features
    )
    return dataset.train_test_split(test_size=DIGITS_TEST_SIZE, seed=DIGITS_SPLIT_SEED, stratify_by_column="label")


def load_image_dataset(
    dataset_name=None,
    dataset_config_name=None,
    train_data_dir=None,
    cache_dir=None,
    test_size=DIGITS_TEST_SIZE,
    seed=DIGITS_SPLIT_SEED,
):
    """The training data as a ``DatasetDict`` with ``train`` and ``test`` splits.

    ``dataset_name`` loads a dataset from the Hub (or a local dataset script/folder), ``train_data_dir`` a local
    image folder (``imagefolder``: class sub-folders give a ``label`` column), neither the built-in digits. A
    dataset without a ``test`` split gets one of ``test_size`` rows split off with ``seed``.
    """
    import datasets

    if dataset_name is not None and train_data_dir is not None:
        raise ValueError("pass only one of --dataset_name or --train_data_dir")
    if dataset_name is None and train_data_dir is None:
        return load_digits_dataset()
    if train_data_dir is not None and not os.path.isdir(train_data_dir):
        raise ValueError(f"--train_data_dir={train_data_dir!r}: no such folder")
    try:
        if dataset_name is not None:
            loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        else:
            loaded = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
    except (FileNotFoundError, ConnectionError) as error:  # includes datasets' DatasetNotFoundError
        argument = "--dataset_name" if dataset_name is not None else "--train_data_dir"
        raise ValueError(f"{argument}: cannot load {dataset_name or train_data_dir!r}: {error}") from error
    if "train" not in loaded:
        raise ValueError(f"the dataset has no 'train' split (splits: {list(loaded)})")
    if "test" not in loaded:
        if len(loaded["train"]) < 2:
            raise ValueError(
                f"{'--dataset_name' if dataset_name is not None else '--train_data_dir'}: the dataset has "
                f"{len(loaded['train'])} image(s); at least 2 are needed (one to train on, one held out as the test split)"
            )
        loaded = loaded["train"].train_test_split(test_size=min(test_size, len(loaded["train"]) // 5 or 1), seed=seed)
    return loaded


def _check_column(dataset, column, argument):
    if column not in dataset.column_names:
        raise ValueError(f"{argument}={column!r} is not a column of the dataset; columns: {dataset.column_names}")


def num_classes_of(dataset, label_column="label"):
    """The class count: the ``ClassLabel`` feature's, else max label + 1."""
    feature = dataset.features.get(label_column)
    if hasattr(feature, "num_classes"):
        return feature.num_classes
    return int(max(dataset[label_column])) + 1


def image_to_tensor(image, resolution=None, channels=None, center_crop=False):
    """A PIL image as a ``[C, H, W]`` float tensor in [−1, 1] (x / 127.5 − 1), resized (bilinear) to ``resolution``
    × ``resolution``; with ``center_crop``, as Diffusers' ``--center_crop``: the shorter side resized to
    ``resolution`` (aspect ratio kept), then the central square cut out."""
    if channels is not None:
        image = image.convert({1: "L", 3: "RGB", 4: "RGBA"}[channels])
    if resolution is not None and center_crop and image.width != image.height:
        scale = resolution / min(image.size)
        width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
        image = image.resize((width, height), Image.BILINEAR)
        left, top = (width - resolution) // 2, (height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    if resolution is not None and image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_uint8(samples):
    """``[B, C, H, W]`` in [−1, 1] → ``[B, H, W, C]`` uint8 numpy array (the inverse of ``image_to_tensor``)."""
    samples = ((samples.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return samples.permute(0, 2, 3, 1).cpu().numpy()


PRELOAD_MAX_BYTES = 256 * 2**20


class ImageTensorDataset(torch.utils.data.Dataset):
    """A split of an image ``datasets.Dataset`` as ``{"sample", "class_labels" | "prompt"}`` items (see module doc)."""

    def __init__(
        self, dataset, image_column, resolution, channels, label_column=None, caption_column=None, center_crop=False
    ):
        self.dataset = dataset
        self.image_column = image_column
        self.resolution = resolution
        self.channels = channels
        self.center_crop = center_crop
        self.label_column = label_column
        self.caption_column = caption_column
        # Decoding an image for every item of every step was ~10% of a training step on the digits (the data wait
        # that benchmarks/run.py reports): a split whose tensors fit in PRELOAD_MAX_BYTES is decoded once, up front.
        self._samples = None
        self._columns = {}
        if len(dataset) and len(dataset) * self._decode_sample(0).numel() * 4 <= PRELOAD_MAX_BYTES:
            self._samples = [self._decode_sample(index) for index in range(len(dataset))]

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        index = int(index)
        item = {"sample": self._samples[index] if self._samples is not None else self._decode_sample(index)}
        if self.label_column is not None:
            item["class_labels"] = int(self._column(self.label_column)[index])
        if self.caption_column is not None:
            item["prompt"] = self._column(self.caption_column)[index]
        return item

    def _decode_sample(self, index):
        return image_to_tensor(
            self.dataset[index][self.image_column], self.resolution, self.channels, self.center_crop
        )

    def _column(self, name):
        """A non-image column, read once (reading a row would decode its image too)."""
        if name not in self._columns:
            self._columns[name] = list(self.dataset[name])
        return self._columns[name]


def _open_images(dataset, image_column):
    """The images of ``dataset``'s image column, each decoded here so that an unreadable file is named (the
    column's ``datasets.Image`` decoding raises deep inside, without the file name)."""
    import datasets

    feature = dataset.features.get(image_column)
    if not isinstance(feature, datasets.Image):
        return list(dataset[image_column])
    images = []
    for row, encoded in enumerate(dataset.cast_column(image_column, datasets.Image(decode=False))[image_column]):
        name = encoded.get("path") or f"row {row}"
        try:
            image = Image.open(io.BytesIO(encoded["bytes"]) if encoded.get("bytes") else encoded["path"])
            image.load()
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for a broken file
            raise ValueError(f"--image_column={image_column!r}: cannot read the image {name}: {error}") from error
        images.append(image)
    return images


def image_dataset_to_tensors(
    dataset,
    image_column="image",
    resolution=None,
    label_column=None,
    caption_column=None,
    num_classes=None,
    center_crop=False,
):
    """Check the columns and the images and wrap a split as an ``ImageTensorDataset``.

    Raises a ``ValueError`` naming the argument for a missing column, an image that cannot be read (naming the
    file), images of mixed channel counts, images of mixed sizes without ``resolution``, or labels outside
    ``[0, num_classes)``. Small datasets are checked in full, larger ones on their first 2048 rows.
    """
    _check_column(dataset, image_column, "--image_column")
    if label_column is not None:
        _check_column(dataset, label_column, "--label_column")
    if caption_column is not None:
        _check_column(dataset, caption_column, "--caption_column")
    checked = dataset.select(range(min(len(dataset), 2048)))
    if len(checked) == 0:
        raise ValueError("the dataset split is empty")
    images = _open_images(checked, image_column)
    modes = {image.mode for image in images}
    channel_counts = {MODE_CHANNELS.get(mode, 3) for mode in modes}
    if len(channel_counts) > 1:
        raise ValueError(
            f"--image_column={image_column!r} holds images of mixed channel counts (modes {sorted(modes)}); "
            "convert them to one mode first"
        )
    sizes = {image.size for image in images}
    if resolution is None and len(sizes) > 1:
        raise ValueError(
            f"--image_column={image_column!r} holds images of mixed sizes ({', '.join(f'{w}x{h}' for w, h in sorted(sizes)[:4])}"
            f"{', ...' if len(sizes) > 4 else ''}); pass --resolution (and --center_crop to keep their aspect ratio)"
        )
    if label_column is not None:
        labels = np.asarray(checked[label_column])
        if num_classes is not None and ((labels < 0) | (labels >= num_classes)).any():
            bad = labels[(labels < 0) | (labels >= num_classes)]
            raise ValueError(
                f"--label_column={label_column!r} has labels {sorted(set(bad.tolist()))[:5]} outside "
                f"[0, {num_classes}) (num_classes={num_classes})"
            )
    return ImageTensorDataset(
        dataset, image_column, resolution, channel_counts.pop(), label_column, caption_column, center_crop
    )


class RandomFlip:
    """Diffusers' ``--random_flip`` for any loss of the training loop: each sample of a batch is mirrored
    left-right with probability 1/2 before ``loss_fn`` sees it. The coin flips are the first draws of the loop's
    per-micro-batch randomness (``losses.BatchRandomness``), so a resumed or multi-process run flips the same images
    as an uninterrupted one-process run."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn

    def __getattr__(self, name):
        # the wrapped loss's training state (learned modules, timestep sampler) is what the training loop looks up
        if name == "loss_fn":
            raise AttributeError(name)
        return getattr(self.loss_fn, name)

    def __call__(self, model, batch, randomness, **kwargs):
        from .losses import as_batch_randomness

        randomness = as_batch_randomness(randomness)
        samples = batch["sample"]
        flip = (randomness.rand(samples.shape[0]) < 0.5).to(samples.device).view(-1, *([1] * (samples.ndim - 1)))
        return self.loss_fn(
            model, {**batch, "sample": torch.where(flip, samples.flip(-1), samples)}, randomness, **kwargs
        )


def stack_dataset(dataset):
    """All items of a dataset of ``{"sample", "class_labels"}`` dicts as ``(samples [N, ...], labels [N] | None)``."""
    items = [dataset[i] for i in range(len(dataset))]
    samples = torch.stack([item["sample"] for item in items])
    labels = torch.tensor([item["class_labels"] for item in items]) if "class_labels" in items[0] else None
    return samples, labels
