"""The data module's own settings, checked before any folder is opened: a typo costs a
one-line error, never a scan of 100,000 files."""

from __future__ import annotations

from detector.errors import ConfigError


def check_loader_settings(
    image_size: int,
    batch_size: int,
    num_workers: int,
    max_pixels: int,
    min_size: int,
    decode_size: int | None,
    shift: int,
) -> None:
    """Sizes, workers and pixel limits: the loader settings whose mistakes would otherwise
    surface deep inside a worker process."""
    for name, value in (("max_pixels", max_pixels), ("min_size", min_size)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"data.{name}={value} must be a positive integer")
    for name, value in (("image_size", image_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"data.{name}={value} must be a positive integer")
    if num_workers < 0:
        raise ConfigError(f"data.num_workers={num_workers} must be >= 0")
    if decode_size is not None and (not isinstance(decode_size, int) or decode_size <= 0):
        raise ConfigError(f"data.decode_size={decode_size} must be a positive integer or null")
    if not isinstance(shift, int) or shift < 0:
        raise ConfigError(f"data.shift={shift} must be a whole number of pixels >= 0")
    decoded = decode_size or image_size
    if shift >= decoded:
        raise ConfigError(
            f"data.shift={shift} must be smaller than the images the loader decodes "
            f"({decoded} px, data.decode_size or data.image_size)"
        )


def check_probability(name: str, value: object) -> float:
    """A probability setting as a float; ``true`` or ``"0.3"`` are refused by name, as a
    comparison would otherwise pass a boolean as 1 or fail deep inside a worker on a string."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}={value!r} must be a probability in [0, 1]")
    return float(value)
