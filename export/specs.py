"""One declarative export spec per component, in the manner of optimum's OnnxConfig and TensorRT's
demo/Diffusion models: input/output names and shapes, dynamic axes, sample inputs and tolerance.
`sdedge.export.onnx_export.export_component` is the one loop that reads them.

Shapes are written with symbols:
    B  batch (dynamic)            h, w  latent height/width (dynamic)      H, W  pixel height/width (dynamic)
    S  tokens (77, fixed)         D     text hidden size (fixed)           C     latent channels (fixed, 4)
    U  UNet input channels (fixed): C, or 9 for an inpainting UNet (latents ⊕ mask ⊕ masked-image latents)
SDXL (SDXL_SPECS) adds: D1, D2 the two text encoders' widths (D = D1 + D2, the UNet's cross-attention width),
    P  text_encoder_2's projection width (the pooled `text_embeds`), T the 6 micro-conditioning time ids
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

    def forward(self, sample, timestep, encoder_hidden_states):  # (B, U, h, w), (B,), (B, 77, D) -> (B, 4, h, w)
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
            TensorSpec("sample", "float32", ("B", "U", "h", "w")),
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


# -- SDXL: two text encoders (penultimate hidden states; the second's pooled, projected output) and a UNet with
# `text_time` added conditioning ---------------------------------------------------------------------------------
class SdxlTextEncoder(torch.nn.Module):
    def __init__(self, pipe):
        super().__init__()
        self.text_encoder = pipe.text_encoder

    def forward(self, input_ids):  # (B, 77) -> (B, 77, D1): the penultimate layer's hidden states, as SDXL reads
        return self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-2]


class SdxlTextEncoder2(torch.nn.Module):
    def __init__(self, pipe):
        super().__init__()
        self.text_encoder = pipe.text_encoder_2

    def forward(self, input_ids):  # (B, 77) -> (B, 77, D2), (B, P)
        out = self.text_encoder(input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


class SdxlUNet(torch.nn.Module):
    def __init__(self, pipe):
        super().__init__()
        self.unet = pipe.unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        # (B, 4, h, w), (B,), (B, 77, D), (B, P), (B, 6) -> (B, 4, h, w)
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False)[0]


SDXL_SPECS: dict[str, ComponentSpec] = {
    "text_encoder": ComponentSpec(
        name="text_encoder",
        inputs=(TensorSpec("input_ids", "int64", ("B", "S"), sample="token_ids"),),
        outputs=(TensorSpec("hidden_states", "float32", ("B", "S", "D1")),),
        module=SdxlTextEncoder,
    ),
    "text_encoder_2": ComponentSpec(
        name="text_encoder_2",
        inputs=(TensorSpec("input_ids", "int64", ("B", "S"), sample="token_ids"),),
        outputs=(TensorSpec("hidden_states", "float32", ("B", "S", "D2")),
                 TensorSpec("text_embeds", "float32", ("B", "P"))),
        module=SdxlTextEncoder2,
    ),
    "unet": ComponentSpec(
        name="unet",
        inputs=(
            TensorSpec("sample", "float32", ("B", "C", "h", "w")),
            TensorSpec("timestep", "float32", ("B",), sample="timestep"),
            TensorSpec("encoder_hidden_states", "float32", ("B", "S", "D")),
            TensorSpec("text_embeds", "float32", ("B", "P")),
            TensorSpec("time_ids", "float32", ("B", "T"), sample="size_ids"),
        ),
        outputs=(TensorSpec("out_sample", "float32", ("B", "C", "h", "w")),),
        module=SdxlUNet,
    ),
    "vae_decoder": SPECS["vae_decoder"],  # fp32: SDXL's VAE overflows in fp16
    "vae_encoder": SPECS["vae_encoder"],
}


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def component_names(pipe) -> tuple[str, ...]:
    """The components a pipeline exports, in order."""
    return tuple(SDXL_SPECS if is_sdxl(pipe) else SPECS)


def component_spec(name: str, pipe) -> ComponentSpec:
    """The spec of component `name` for this pipeline: the vae_decoder's follows the pipeline's VAE class."""
    if name == "vae_decoder" and type(pipe.vae).__name__ == "AutoencoderTiny":
        return TINY_VAE_DECODER
    return (SDXL_SPECS if is_sdxl(pipe) else SPECS)[name]


def fixed_dims(pipe) -> dict[str, int]:
    """The symbols whose values come from the model's config."""
    c = pipe.vae.config.latent_channels
    return {"S": pipe.tokenizer.model_max_length if pipe.tokenizer is not None else 77,
            "D": pipe.text_encoder.config.hidden_size, "C": c, "2C": 2 * c, "U": pipe.unet.config.in_channels,
            **(sdxl_dims(pipe) if is_sdxl(pipe) else {})}


def sdxl_dims(pipe) -> dict[str, int]:
    d1, d2 = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    return {"D1": d1, "D2": d2, "D": d1 + d2, "P": pipe.text_encoder_2.config.projection_dim, "T": 6}


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
        elif t.sample == "size_ids":  # SDXL's micro-conditioning: pixel sizes and crop offsets
            tensors.append(torch.randint(0, 1025, shape, generator=generator).float())
        elif t.sample == "image":
            tensors.append(torch.rand(shape, generator=generator) * 2 - 1)
        else:
            tensors.append(torch.randn(shape, generator=generator))
    return tuple(tensors)
