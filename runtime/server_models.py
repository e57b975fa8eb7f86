"""The server's request and response models, built for one bundle: its sizes, multiples, image count, defaults and
schedulers are the fields' limits, so the OpenAPI schema states them and pydantic refuses what is outside them.

(No `from __future__ import annotations` here: pydantic and FastAPI read these annotations at class creation.)
"""

from dataclasses import dataclass
from typing import Annotated, Any, Literal


@dataclass(frozen=True)
class Models:
    """The classes `request_models` builds: the three request bodies, the JSON answer, an error body."""

    generate: type
    img2img: type
    inpaint: type
    answer: type
    error: type


def json_integer(value):
    """JSON Schema counts 128.0 as an integer: accept an integral float, refuse strings and booleans."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def request_models(settings, manifest, schedulers: tuple[str, ...], max_images: int, default_steps: int) -> Models:
    """The models of a server with `settings` (runtime/server.py ServeSettings) serving a bundle of `manifest`."""
    generate = _generate_request(settings, manifest, schedulers, max_images, default_steps)
    img2img, inpaint = _upload_requests(generate, settings, manifest.shapes)
    return Models(generate=generate, img2img=img2img, inpaint=inpaint, **_answers())


def _generate_request(settings, m, schedulers: tuple[str, ...], max_images: int, default_steps: int) -> type:
    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

    Int = Annotated[int, BeforeValidator(json_integer)]
    s = m.shapes

    class GenerateRequest(BaseModel):
        """Text to image. Unknown fields are refused; types are strict (no "5" for 5)."""

        model_config = ConfigDict(strict=True, extra="forbid")

        prompt: str = Field(min_length=1, max_length=settings.max_prompt_chars, pattern=r"\S",
                            description="What to draw (CLIP keeps the first 77 tokens).")
        negative_prompt: str = Field("", max_length=settings.max_prompt_chars)
        steps: Int = Field(default_steps, ge=1, le=settings.max_steps, description="Denoising steps.")
        guidance: float = Field(m.defaults.guidance, ge=0.0, le=30.0, allow_inf_nan=False,
                                description="Classifier-free guidance scale (≤ 1 disables it).")
        seed: Annotated[int, Field(ge=0, le=2 ** 32 - 1), BeforeValidator(json_integer)] | None = Field(
            None, description="Omitted: a random seed (returned).")
        width: Int = Field(s.default_width, ge=s.width_min, le=s.width_max, multiple_of=s.pixel_multiple)
        height: Int = Field(s.default_height, ge=s.height_min, le=s.height_max, multiple_of=s.pixel_multiple)
        scheduler: str = Field(m.defaults.scheduler, json_schema_extra={"enum": list(schedulers)})
        n: Int = Field(1, ge=1, le=max_images, description="Images per request (n > 1 answers JSON).")
        response_format: Literal["png", "json"] | None = Field(
            None,
            description="png: image/png (n = 1); json: base64 PNGs. Default: png unless Accept asks for JSON or n > 1.")
        timeout: Annotated[float, Field(ge=min(1.0, settings.timeout), le=settings.timeout, allow_inf_nan=False)] | None = Field(
            None, description=f"Seconds to wait at most (≤ the server's {settings.timeout:g}).")

        @model_validator(mode="after")
        def _check(self):
            if self.scheduler not in schedulers:
                raise ValueError(f"scheduler {self.scheduler!r}: choose one of {', '.join(schedulers)}")
            if self.response_format == "png" and self.n > 1:
                raise ValueError("n > 1 needs response_format 'json' (one PNG per response)")
            return self

    return GenerateRequest


def _upload_requests(generate: type, settings, s) -> tuple[type, type]:
    from pydantic import BeforeValidator, Field

    Int = Annotated[int, BeforeValidator(json_integer)]
    upload_doc = (f"base64 PNG, JPEG or WebP file (a data: URL too), at most {settings.max_upload_bytes:,} bytes "
                  f"and {settings.max_upload_pixels:,} pixels")
    size_doc = "Omitted: the image's own. The image (and mask) are resized to width × height."

    class Img2ImgRequest(generate):
        """Image to image: the image, noised to `strength`, is denoised with the prompt (the bundle needs its
        vae_encoder). The output has width × height (default: the image's size)."""

        image: str = Field(min_length=1, description=f"The init image: {upload_doc}.")
        strength: float = Field(0.8, gt=0.0, le=1.0, allow_inf_nan=False,
                                description="How much to change the image: the share of the steps that run.")
        width: Int | None = Field(None, ge=s.width_min, le=s.width_max, multiple_of=s.pixel_multiple,
                                  description=size_doc)
        height: Int | None = Field(None, ge=s.height_min, le=s.height_max, multiple_of=s.pixel_multiple,
                                   description=size_doc)

    class InpaintRequest(Img2ImgRequest):
        """Inpainting: the white part of the mask is repainted, the rest kept (a 9-channel inpainting UNet, or any
        bundle with a vae_encoder by blending)."""

        mask: str = Field(min_length=1, description=f"White = repaint, black = keep: {upload_doc}.")
        strength: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False,
                                description="1 repaints the masked part from noise.")

    return Img2ImgRequest, InpaintRequest


def _answers() -> dict[str, type]:
    from pydantic import BaseModel, Field

    class GenerateJSON(BaseModel):
        job_id: str
        seed: int
        images: list[str] = Field(description="base64 PNG images")
        settings: dict[str, Any]
        timings: dict[str, float]

    class ErrorBody(BaseModel):
        detail: Any

    return {"answer": GenerateJSON, "error": ErrorBody}
