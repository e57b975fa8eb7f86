"""One declarative export spec per component, in the manner of optimum's OnnxConfig and TensorRT's
demo/Diffusion models: input/output names and shapes, dynamic axes, sample inputs and tolerance.
`sdedge.export.onnx_export.export_component` is the one loop that reads them.

Shapes are written with symbols:
    B  batch (dynamic)            h, w  latent height/width (dynamic)      H, W  pixel height/width (dynamic)
    S  tokens (77, fixed)         D     text hidden size (fixed)           C     latent channels (fixed, 4)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Symbols that become named dynamic axes in the ONNX graph.
DYNAMIC_AXES = {"B": "batch", "h": "latent_height", "w": "latent_width", "H": "height", "W": "width"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy/ONNX dtype name of the exported graph's tensor
    shape: tuple[str | int, ...]
    sample: str = "normal"  # how sample inputs are drawn: normal | token_ids | timestep | image


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    module: Callable[[object], torch.nn.Module]  # pipeline -> module whose forward takes the inputs in order
    tolerance: float = 1e-3  # max abs error of fp32 ONNX vs PyTorch


# -- wrappers: forward() with positional tensors in, one tensor out ---------------------------------------------
class TextEncoder(torch.nn.Module):
    def __init__(self, pipe):
        super().__init__()
        self.text_encoder = pipe.text_encoder

    def forward(self, input_ids):  # (B, 77) -> (B, 77, D)
        return self.text_encoder(input_ids, return_dict=False)[0]


class UNet(torch.nn.Module):
    def __init__(self, pipe):
        super().__init__()
        self.unet = pipe.unet

    def forward(self, sample, timestep, encoder_hidden_states):  # (B, 4, h, w), (B,), (B, 77, D) -> (B, 4, h, w)
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoder(torch.nn.Module):
    def __init__(self, pipe):
        super().__init__()
        self.vae = pipe.vae

    def forward(self, latent_sample):  # (B, 4, h, w) -> (B, 3, 8h, 8w)
        return self.vae.decode(latent_sample, return_dict=False)[0]


class TinyVaeDecoder(torch.nn.Module):
    """A TAESD-architecture `AutoencoderTiny`'s decoder (export --decoder): it decodes the UNet's latents divided
    by its own scaling_factor (1.0 for TAESD), not the base VAE's."""

    def __init__(self, pipe):
        super().__init__()
        self.vae = pipe.vae

    def forward(self, latent_sample):  # (B, 4, h, w) -> (B, 3, f·h, f·w) in [-1, 1], f = 2^(decoder blocks - 1)
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    def __init__(self, pipe):
        super().__init__()
        self.vae = pipe.vae

    def forward(self, sample):  # (B, 3, H, W) -> (B, 2C, H/8, W/8): mean ⊕ log-variance
        return self.vae.encode(sample, return_dict=False)[0].parameters


SPECS: dict[str, ComponentSpec] = {
    "text_encoder": ComponentSpec(
        name="text_encoder",
        inputs=(TensorSpec("input_ids", "int64", ("B", "S"), sample="token_ids"),),
        outputs=(TensorSpec("last_hidden_state", "float32", ("B", "S", "D")),),
        module=TextEncoder,
    ),
    "unet": ComponentSpec(
        name="unet",
        inputs=(
            TensorSpec("sample", "float32", ("B", "C", "h", "w")),
            TensorSpec("timestep", "float32", ("B",), sample="timestep"),
            TensorSpec("encoder_hidden_states", "float32", ("B", "S", "D")),
        ),
        outputs=(TensorSpec("out_sample", "float32", ("B", "C", "h", "w")),),
        module=UNet,
    ),
    "vae_decoder": ComponentSpec(
        name="vae_decoder",
        inputs=(TensorSpec("latent_sample", "float32", ("B", "C", "h", "w")),),
        outputs=(TensorSpec("sample", "float32", ("B", 3, "H", "W")),),
        module=VaeDecoder,
    ),
    "vae_encoder": ComponentSpec(
        name="vae_encoder",
        inputs=(TensorSpec("sample", "float32", ("B", 3, "H", "W"), sample="image"),),
        outputs=(TensorSpec("latent_moments", "float32", ("B", "2C", "h", "w")),),
        module=VaeEncoder,
    ),
}


# The vae_decoder of an AutoencoderTiny (TAESD architecture): same tensors as the full decoder's, its own module
TINY_VAE_DECODER = ComponentSpec(
    name="vae_decoder",
    inputs=(TensorSpec("latent_sample", "float32", ("B", "C", "h", "w")),),
    outputs=(TensorSpec("sample", "float32", ("B", 3, "H", "W")),),
    module=TinyVaeDecoder,
)


def component_spec(name: str, pipe) -> ComponentSpec:
    """The spec of component `name` for this pipeline: the vae_decoder's follows the pipeline's VAE class."""
    if name == "vae_decoder" and type(pipe.vae).__name__ == "AutoencoderTiny":
        return TINY_VAE_DECODER
    return SPECS[name]


def fixed_dims(pipe) -> dict[str, int]:
    """The symbols whose values come from the model's config."""
    c = pipe.unet.config.in_channels
    return {"S": pipe.tokenizer.model_max_length if pipe.tokenizer is not None else 77,
            "D": pipe.text_encoder.config.hidden_size, "C": c, "2C": 2 * c}


def concrete_shape(shape: tuple[str | int, ...], dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else dims[d] for d in shape)


def manifest_shape(shape: tuple[str | int, ...], fixed: dict[str, int]) -> tuple[int | str, ...]:
    """Shape for the manifest: fixed symbols resolved, dynamic ones named as in the ONNX graph."""
    return tuple(d if isinstance(d, int) else fixed.get(d, DYNAMIC_AXES.get(d, d)) for d in shape)


def dynamic_axes(spec: ComponentSpec) -> dict[str, dict[int, str]]:
    axes = {}
    for t in (*spec.inputs, *spec.outputs):
        named = {i: DYNAMIC_AXES[d] for i, d in enumerate(t.shape) if isinstance(d, str) and d in DYNAMIC_AXES}
        if named:
            axes[t.name] = named
    return axes


def sample_inputs(spec: ComponentSpec, dims: dict[str, int], generator: torch.Generator, vocab_size: int) -> tuple:
    """Deterministic sample inputs for tracing and parity checks."""
    tensors = []
    for t in spec.inputs:
        shape = concrete_shape(t.shape, dims)
        if t.sample == "token_ids":
            ids = torch.randint(0, vocab_size - 2, shape, generator=generator)
            ids[:, 0] = vocab_size - 2  # BOS, then EOS padding after a few tokens as real prompts have
            ids[:, shape[1] // 4 :] = vocab_size - 1
            tensors.append(ids)
        elif t.sample == "timestep":
            tensors.append(torch.randint(0, 1000, shape, generator=generator).float())
        elif t.sample == "image":
            tensors.append(torch.rand(shape, generator=generator) * 2 - 1)
        else:
            tensors.append(torch.randn(shape, generator=generator))
    return tuple(tensors)
