"""`ArrayLoader`: in-memory arrays fed to `model.fit` as a `keras.utils.PyDataset`.

Images are normalized, shuffled and augmented in numpy so that every batch
depends only on `(seed, epoch, batch index)`: the training loop needs neither
TensorFlow nor `tf.data`, and a resumed run sees the same batches as an
uninterrupted one on every backend. `EpochSetter` tells the loaders which
epoch `fit` is starting.
"""

import keras
import numpy as np

from keras_ema.checks import check_int
from keras_ema.checks import is_int


class ArrayLoader(keras.utils.PyDataset):
    """Batches of in-memory images, normalized, shuffled and augmented in numpy.

    Each batch is a pure function of `(seed, epoch, batch index)`:

    - Normalization: `(x / 255 - mean) / std`, per channel, in float32.
    - `shuffle=True`: the order of epoch `e` is
      `np.random.default_rng([seed, e]).permutation(n)`; batch `i` is slice
      `i` of it. Without shuffling the order is the array order.
    - `augment=True`: random crop with 4 pixels of zero padding (black, before
      normalization, as torchvision's `RandomCrop(padding=4)`) and random
      horizontal flip, drawn from `np.random.default_rng([seed, e, i])`.

    The augmentation is written in numpy rather than with
    `keras.layers.RandomCrop` / `RandomFlip` so that the batches depend only on
    `(seed, epoch, batch)`: a resumed run reproduces them exactly, on every
    backend, with any number of workers.

    The epoch: `set_epoch(e)` is authoritative. Keras calls
    `on_epoch_begin` / `on_epoch_end` around each pass, but also around
    passes that are not training epochs (Keras 3.15 calls `on_epoch_end` once
    before the first epoch on TensorFlow, and runs a one-batch pass on JAX),
    so without `set_epoch` the loader only advances after a pass that served
    its last batch, which is right for a fresh `fit` but not for a resumed
    one. Training scripts must therefore pass `EpochSetter(loader)` as a
    callback, which calls `loader.set_epoch(epoch)` at the start of every
    epoch, `initial_epoch` included, and `shuffle=False` to `fit` (Keras
    would otherwise reorder the batches of a `PyDataset` with Python's
    `random`, which a resumed run does not reproduce).

    Args:
        x: uint8 array `(n, height, width, channels)`.
        y: int array `(n,)`, or `None` to yield images only.
        batch_size: int.
        mean: float or per-channel floats, in 0..1 units.
        std: float or per-channel floats, in 0..1 units, positive.
        shuffle: bool, reshuffle every epoch. Defaults to `False`.
        augment: bool, random crop (pad 4) and horizontal flip. Defaults to
            `False`.
        seed: int >= 0. Defaults to `0`.
        drop_remainder: bool, drop the last incomplete batch. Defaults to
            `False`.
        shard: `(index, count)`: yield only the `index`-th of `count` equal
            contiguous slices of every batch, for process `index` of a
            multi-process run whose processes feed their own share of the
            global batch (JAX's `keras.distribution`). The batch is made
            whole first (order and augmentation as without a shard), then
            sliced; an incomplete last batch loses its last `len % count`
            examples so that the slices stay equal. `None` yields whole
            batches. Defaults to `None`.
        **kwargs: `workers`, `use_multiprocessing`, `max_queue_size` of
            `keras.utils.PyDataset`.

    Example:

    ```python
    data = load_dataset("digits")
    train = ArrayLoader(data.x_train, data.y_train, 128, data.mean, data.std,
                        shuffle=True, augment=True, seed=0)
    val = ArrayLoader(data.x_val, data.y_val, 256, data.mean, data.std)
    model.fit(train, validation_data=val, epochs=10, shuffle=False,
              callbacks=[EpochSetter(train)])
    ```
    """

    PAD = 4

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray | None,
        batch_size: int,
        mean: float | np.ndarray,
        std: float | np.ndarray,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_remainder: bool = False,
        shard: tuple[int, int] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        batch_size = check_int("batch_size", batch_size, 1)
        seed = check_int("seed", seed, 0)
        if shard is not None:
            try:
                index, count = shard
            except (TypeError, ValueError):
                index = count = None
            if not (
                is_int(index) and is_int(count) and 0 <= index < count <= batch_size
            ):
                raise ValueError(
                    "Invalid value for argument `shard`: expected `(index, "
                    "count)` with 0 <= index < count <= batch_size. Received: "
                    f"shard={shard!r}, batch_size={batch_size!r}."
                )
            shard = (int(index), int(count))
        self.shard = shard
        x = np.asarray(x)
        if x.ndim != 4 or x.dtype != np.uint8:
            raise ValueError(
                "Invalid value for argument `x`: expected uint8 images of shape "
                "(n, height, width, channels). Received: x with shape "
                f"{x.shape} and dtype {x.dtype}."
            )
        if y is not None:
            y = np.asarray(y)
            if y.shape != (len(x),):
                raise ValueError(
                    "Invalid value for argument `y`: expected shape "
                    f"({len(x)},) to match x. Received: y with shape {y.shape}."
                )
            y = y.astype(np.int32, copy=False)
        channels = x.shape[-1]
        mean = np.broadcast_to(np.asarray(mean, np.float32), (channels,))
        std = np.broadcast_to(np.asarray(std, np.float32), (channels,))
        if not np.all(std > 0) or not np.all(np.isfinite(mean)):
            raise ValueError(
                "Invalid value for argument `std` or `mean`: std must be "
                f"positive and both finite. Received: mean={mean.tolist()}, "
                f"std={std.tolist()}."
            )
        num_batches = (
            len(x) // batch_size if drop_remainder else -(-len(x) // batch_size)
        )
        if num_batches == 0:
            raise ValueError(
                f"ArrayLoader would yield no batch: {len(x)} example(s) with "
                f"batch_size={batch_size} and drop_remainder={drop_remainder}. "
                "Use a smaller batch_size or drop_remainder=False."
            )
        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.mean = mean.copy()
        self.std = std.copy()
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_remainder = drop_remainder
        # (x / 255 - mean) / std == x * scale - shift, one pass fewer. Tiled
        # over a whole image so that each pass is one long contiguous loop:
        # broadcasting a (channels,) vector runs numpy's inner loop over only
        # `channels` elements at a time, several times slower.
        self._scale = (1.0 / (255.0 * self.std)).astype(np.float32)
        self._shift = (self.mean / self.std).astype(np.float32)
        pixels = x.shape[1] * x.shape[2]
        self._scale_image = np.tile(self._scale, pixels)
        self._shift_image = np.tile(self._shift, pixels)
        self._num_batches = num_batches
        self._epoch = 0
        self._in_pass = False
        self._served_last = False
        self._order_cache = (None, None)

    @property
    def epoch(self) -> int:
        """The epoch whose order and augmentation `__getitem__` uses."""
        return self._epoch

    def set_epoch(self, epoch: int):
        """Selects the epoch of the next batches; see the class docstring."""
        self._epoch = check_int("epoch", epoch, 0)
        self._in_pass = False
        self._served_last = False

    def on_epoch_begin(self):
        self._in_pass = True
        self._served_last = False

    def on_epoch_end(self):
        if self._in_pass and self._served_last:
            self._epoch += 1
        self._in_pass = False
        self._served_last = False

    def __len__(self):
        return self._num_batches

    def _order(self, epoch):
        cached_epoch, order = self._order_cache  # One read: thread-safe.
        if cached_epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(
                len(self.x)
            )
            self._order_cache = (epoch, order)
        return order

    def __getitem__(self, index):
        if not 0 <= index < self._num_batches:
            raise IndexError(
                f"Batch index {index} out of range for {self._num_batches} "
                "batches."
            )
        epoch = self._epoch
        start = index * self.batch_size
        stop = min(start + self.batch_size, len(self.x))
        if self.shuffle:
            rows = self._order(epoch)[start:stop]
            x = self.x[rows]
            y = None if self.y is None else self.y[rows]
        else:
            x = self.x[start:stop]
            y = None if self.y is None else self.y[start:stop]
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, index])
            x = crop_and_flip(x, rng, self.PAD)
        shape = x.shape
        x = x.astype(np.float32).reshape(len(x), -1)
        x *= self._scale_image
        x -= self._shift_image
        x = x.reshape(shape)
        if self.shard is not None:
            part, count = self.shard
            size = len(x) // count
            x = x[part * size:(part + 1) * size]
            y = None if y is None else y[part * size:(part + 1) * size]
        if index == self._num_batches - 1:
            self._served_last = True
        return x if y is None else (x, y)


def crop_and_flip(
    images: np.ndarray, rng: np.random.Generator, pad: int = 4
) -> np.ndarray:
    """Random crop from a zero-padded image plus random horizontal flip.

    For each image, draws in this order from `rng`: the vertical offsets
    (`rng.integers(0, 2 * pad + 1, n)`), the horizontal offsets (same), and
    the flips (`rng.random(n) < 0.5`). An offset of `pad` is the original
    position.

    Args:
        images: uint8 array `(n, height, width, channels)`.
        rng: a `numpy.random.Generator`.
        pad: int, the zero padding on each side. Defaults to `4`.

    Returns:
        A new array of the same shape and dtype.
    """
    n, height, width, channels = images.shape
    top = rng.integers(0, 2 * pad + 1, size=n)
    left = rng.integers(0, 2 * pad + 1, size=n)
    flip = rng.random(n) < 0.5
    padded = np.zeros(
        (n, height + 2 * pad, width + 2 * pad, channels), images.dtype
    )
    padded[:, pad:pad + height, pad:pad + width] = images
    # windows[i, t, l] is the crop of image i at offset (t, l), a view with
    # each of its rows contiguous: one gather copies whole rows, where a
    # gather of single pixels moves a few bytes per index.
    s0, s1, s2, s3 = padded.strides
    windows = np.lib.stride_tricks.as_strided(
        padded,
        (n, 2 * pad + 1, 2 * pad + 1, height, width * channels),
        (s0, s1, s2, s1, s3),
        writeable=False,
    )
    crops = windows[np.arange(n), top, left].reshape(images.shape)
    flipped = np.flatnonzero(flip)
    if flipped.size:
        # Reversing the columns of (height, width, channels) runs numpy's
        # inner loop over one pixel at a time; one channel at a time, it runs
        # over whole rows.
        source = crops[flipped]
        mirror = np.empty_like(source)
        for channel in range(channels):
            mirror[..., channel] = source[:, :, ::-1, channel]
        crops[flipped] = mirror
    return crops


class EpochSetter(keras.callbacks.Callback):
    """Tells `ArrayLoader`s which epoch `fit` is starting.

    Calls `loader.set_epoch(epoch)` in `on_epoch_begin`, so the data order and
    augmentation of epoch `e` are the same in a fresh run and in a run resumed
    at `e` (`initial_epoch`, `keras.callbacks.BackupAndRestore`).

    Args:
        *loaders: the `ArrayLoader`s to drive.

    Example:

    ```python
    model.fit(train, epochs=200, shuffle=False,
              callbacks=[EpochSetter(train), keras.callbacks.BackupAndRestore(d)])
    ```
    """

    def __init__(self, *loaders: ArrayLoader):
        super().__init__()
        for loader in loaders:
            if not hasattr(loader, "set_epoch"):
                raise ValueError(
                    "Invalid argument for EpochSetter: expected objects with "
                    f"a `set_epoch` method such as ArrayLoader. Received: "
                    f"{loader!r}."
                )
        self.loaders = loaders

    def on_epoch_begin(self, epoch, logs=None):
        for loader in self.loaders:
            loader.set_epoch(epoch)
