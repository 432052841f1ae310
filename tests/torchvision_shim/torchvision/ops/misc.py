class FrozenBatchNorm2d:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision shim: FrozenBatchNorm2d must not be used by fifa_hf")
