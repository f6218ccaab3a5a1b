"""What one benchmark case is: the harness plans them, the worker measures one."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("tensorflow", "jax", "torch")


PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


FRAMEWORKS = ("keras", "timm")


# timm's names for this zoo's architectures (the peer builds these).
TIMM_NAMES = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "resnext50_32x4d": "resnext50_32x4d",
    "mobilenet_v2": "mobilenetv2_100",
    "mobilenet_v3_large": "mobilenetv3_large_100",
    "efficientnet_b0": "efficientnet_b0",
    "densenet121": "densenet121",
    "convnext_tiny": "convnext_tiny",
    "vgg16": "vgg16",
    "vit_tiny": "vit_tiny_patch16_224",
}


@dataclass(frozen=True)
class Case:
    """One measured combination."""

    arch: str
    framework: str = "keras"  # or "timm" (PyTorch)
    backend: str = "tensorflow"  # Keras backend; "torch" for timm
    precision: str = "float32"
    xla: bool = False  # Keras jit_compile; torch.compile for timm
    image_size: int = 32
    batch_size: int = 64
    steps: int = 20
    warmup: int = 3
    data: str = "synthetic"  # or "prepared": the train split of data/prepared
    prepared_dir: str = "data/prepared"
    num_classes: int = 10
    small_input: bool = True
    devices: int = 1  # data-parallel replicas; batch_size is the global batch

    def key(self) -> tuple:
        """What a baseline row must match to be compared with this one."""
        return (self.arch, self.framework, self.backend, self.precision, self.xla, self.devices)

    def label(self) -> str:
        xla = "xla" if self.xla else "no-xla"
        on = f" on {self.devices} devices" if self.devices > 1 else ""
        return f"{self.arch} {self.framework}/{self.backend} {self.precision} {xla}{on}"
