def __getattr__(name):
    raise RuntimeError(f"torchvision shim: transforms.functional.{name} must not be used by fifa_hf")
