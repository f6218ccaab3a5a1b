"""What one benchmark case is: the harness plans them, the worker measures one."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("tensorflow", "jax", "torch")


PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


FRAMEWORKS = ("keras", "timm", "onnxruntime", "litert")


# `--exported` runtimes: the Keras model converted, as (framework, precision) cases.
EXPORTED = {
    "onnx": ("onnxruntime", "float32"),
    "onnx_int8": ("onnxruntime", "int8"),
    "litert": ("litert", "float32"),
    "litert_int8": ("litert", "int8"),
}


# Inference batches every case of a sweep with exported copies also measures, so that
# its rows compare at the same batches.
LATENCY_BATCHES = (1, 32)


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
    framework: str = "keras"  # or "timm" (PyTorch), or "onnxruntime"/"litert" (exported)
    backend: str = "tensorflow"  # Keras backend; "torch" for timm; the converting one if exported
    precision: str = "float32"  # "int8" for a quantized exported copy
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
    infer_batches: tuple[int, ...] = ()  # inference latency measured at these batches too

    def __post_init__(self):
        object.__setattr__(self, "infer_batches", tuple(self.infer_batches))  # JSON gives a list

    @property
    def exported(self) -> bool:
        return self.framework not in ("keras", "timm")

    def key(self) -> tuple:
        """What a baseline row must match to be compared with this one."""
        return (self.arch, self.framework, self.backend, self.precision, self.xla, self.devices)

    def label(self) -> str:
        if self.exported:
            return f"{self.arch} {self.framework} {self.precision} (from keras/{self.backend})"
        xla = "xla" if self.xla else "no-xla"
        on = f" on {self.devices} devices" if self.devices > 1 else ""
        return f"{self.arch} {self.framework}/{self.backend} {self.precision} {xla}{on}"
