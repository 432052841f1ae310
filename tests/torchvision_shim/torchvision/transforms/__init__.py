import enum


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


class _Unused:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"torchvision shim: {type(self).__name__} must not be used by fifa_hf")


class Normalize(_Unused): ...


class Compose(_Unused): ...


class RandomResizedCrop(_Unused): ...


class ToTensor(_Unused): ...


class Resize(_Unused): ...


class CenterCrop(_Unused): ...


class ColorJitter(_Unused): ...


class Grayscale(_Unused): ...
