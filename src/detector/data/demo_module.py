"""The embedded demo sets as a data module: made on first use, then read like any folder."""

from __future__ import annotations

import logging

from detector.data.datamodule import ImageFolderDataModule
from detector.data.demo import (
    DEFAULT_TEST_PER_CLASS,
    DEFAULT_TRAIN_PER_CLASS,
    STAMP_NAME,
    ensure_demo,
)
from detector.data.synthesis import DECODERS
from detector.data.synthesis import IMAGE_SIZE as DEMO_IMAGE_SIZE
from detector.errors import ConfigError

log = logging.getLogger(__name__)


class DemoDataModule(ImageFolderDataModule):
    """The embedded demo set: made into ``root`` on first use (once per node, by local rank 0).

    ``python train.py data.root=DIR`` keeps the demo group but points at a user's folder: a
    folder that already holds ``train/`` and was not made by the generator is used as it is.
    """

    def __init__(
        self,
        root: str,
        demo_seed: int = 0,
        demo_image_size: int = DEMO_IMAGE_SIZE,
        demo_train_per_class: int = DEFAULT_TRAIN_PER_CLASS,
        demo_test_per_class: int = DEFAULT_TEST_PER_CLASS,
        demo_generator: str = "transposed",
        **kwargs,
    ) -> None:
        """``demo_image_size`` 32: the CIFAKE-shaped set; larger: the high-resolution set
        (``data=demo_hr``: native crops of the photographs, for crop models).
        ``demo_generator``: the FAKE images' decoder, ``transposed`` (transposed convolutions)
        or ``nearest`` (nearest-neighbour upsampling + convolution, ``data=demo_b``)."""
        super().__init__(root=root, **kwargs)
        if demo_generator not in DECODERS:
            raise ConfigError(
                f"data.demo_generator={demo_generator!r} must be one of {', '.join(DECODERS)}"
            )
        self.demo_seed = demo_seed
        self.demo_sizes = {
            "decoder": demo_generator,
            "image_size": demo_image_size,
            "train_per_class": demo_train_per_class,
            "test_per_class": demo_test_per_class,
        }

    makes_root = True

    def prepare_data(self) -> None:

        if (self.root / "train").is_dir() and not (self.root / STAMP_NAME).exists():
            log.info("%s is not a demo folder: using it as it is", self.root)
        else:
            ensure_demo(self.root, seed=self.demo_seed, **self.demo_sizes)
        super().prepare_data()
