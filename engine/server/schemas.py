"""Request and response bodies of the HTTP API (pydantic). One request here is one request of
`Pipeline.__call__`, with the same names and defaults as `python -m engine generate`."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from ipadapter_instruct.engine import DEFAULT_NEGATIVE, DEFAULT_PROMPT, bounds
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.guidance import MODES
from ipadapter_instruct.engine.loading import SCHEDULERS

MAX_STEPS = 250       # a server bound, far above any useful schedule (the release uses 30)
MAX_NUM_IMAGES = 8
SCHEDULER_NAMES = ("default", *SCHEDULERS)
# the tasks the adapter was trained on, with one phrasing each (the web page offers them as presets)
TASK_PRESETS = {
    "everything": "use everything from this image",
    "style": "use the style of this image",
    "composition": "use the composition of this image",
    "object": "take the object from this image",
    "face": "copy the face from this image",
}


# old field names, kept as documented aliases: a body may use either, never both (a 422 naming the field)
GENERATE_ALIASES = {"image": "ip_adapter_image", "num_images": "num_images_per_prompt"}
EDIT_ALIASES = {"adapter_image": "ip_adapter_image", "num_images": "num_images_per_prompt"}


def renamed(data, aliases: dict, model: str):
    """A body's old field names as the new ones; both at once: a validation error on the new name."""
    if not isinstance(data, dict):
        return data
    for old, new in aliases.items():
        if old in data and new in data:
            error = PydanticCustomError("alias_clash", "give {new} or its old name {old}, not both",
                                        {"new": new, "old": old})
            raise ValidationError.from_exception_data(model, [
                InitErrorDetails(type=error, loc=(new,), input=data[old])])
    return {aliases.get(k, k): v for k, v in data.items()}


def not_bool(v):
    """JSON true is no integer here (Python's bool is an int, and pydantic's lax mode takes it as 1)."""
    if isinstance(v, bool):
        raise ValueError("must be an integer, not a boolean")
    return v


Int = Annotated[int, BeforeValidator(not_bool)]  # lax otherwise: multipart's "30" is still 30


def within_bounds(value, field: str):
    """engine/bounds.py's rule for a request field (every number of a per-block scale dict too): ValueError, which
    the API answers with a 422 naming the field."""
    try:
        return bounds.scale(value, field=field) if field == "scale" else bounds.number(field, value)
    except EngineError as e:
        raise ValueError(str(e).removeprefix(field + " ")) from None


BlockScale = dict[str, Any]  # InstantStyle's per-block dict, e.g. {"up": {"block_0": [0.0, 1.0, 0.0]}}


class GenerateRequest(BaseModel):
    """POST /v1/generate. `ip_adapter_image` (old name `image`) is base64 (or a data URL) of a PNG, JPEG or WebP
    file; never a path or URL. No seed (or null): the server draws one and answers it."""
    model_config = ConfigDict(extra="forbid")

    prompt: Optional[str] = Field(None, max_length=4096, description=f"default: with an adapter {DEFAULT_PROMPT!r}; "
                                  "without one a prompt is required")
    negative_prompt: Optional[str] = Field(None, max_length=4096, description="default: with an adapter "
                                           f"{DEFAULT_NEGATIVE!r}; without one none")
    ip_adapter_image: Optional[str] = Field(None, description="the adapter's reference image: base64 or "
                                            "data:image/...;base64,... (old name: image)")
    instruct: Optional[str] = Field(None, max_length=4096, description="what to take from the image")
    scale: Union[float, BlockScale] = Field(0.8, description="adapter strength, or a per-block dict")
    guidance_scale: float = 6.0
    instruct_guidance_scale: float = 6.0
    image_guidance_scale: float = 1.0
    guidance_mode: Literal[MODES] = "auto"  # type: ignore[valid-type]
    num_inference_steps: Int = Field(30, ge=1, le=MAX_STEPS)
    seed: Optional[Int] = Field(None, ge=0, lt=2**63, description="default: a fresh random seed, answered")
    height: Optional[Int] = Field(None, ge=1, description="default: the model's native size")
    width: Optional[Int] = Field(None, ge=1)
    num_images_per_prompt: Int = Field(1, ge=1, le=MAX_NUM_IMAGES, description="old name: num_images")
    scheduler: Literal[SCHEDULER_NAMES] = "default"  # type: ignore[valid-type]
    stream: bool = Field(False, description="server-sent events: progress, then result")
    # a server started with --controlnet: the net's input and its strength
    control_image: Optional[str] = Field(None, description="the ControlNet's input: base64 or a data URL")
    controlnet_conditioning_scale: float = 1.0
    control_guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    control_guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    guess_mode: bool = False
    # where and when the adapter acts: a regional mask (white = the adapter acts there, diffusers'
    # IPAdapterMaskProcessor conventions) and the fraction of the steps it acts in
    adapter_mask: Optional[str] = Field(None, description="mask image: base64 or a data URL")
    adapter_start: float = Field(0.0, ge=0.0, le=1.0)
    adapter_end: float = Field(1.0, ge=0.0, le=1.0)
    # start from a photo (engine/img2img.py): img2img, and with a mask inpainting (white = repaint, black = keep)
    init_image: Optional[str] = Field(None, description="the photo to start from: base64 or a data URL; the output "
                                      "is its size (on the VAE grid) unless height/width are given")
    strength: Optional[float] = Field(None, description="how far from the photo to start, in (0, 1]: 1 runs every "
                                      "step; default 0.8, with a mask 1.0 (diffusers' defaults)")
    mask_image: Optional[str] = Field(None, description="inpainting: the photo's size, white = repaint, black = keep; "
                                      "base64 or a data URL")
    # SDXL's size conditioning (diffusers' names; an SDXL server only): [height, width] and [top, left]
    original_size: Optional[list[Int]] = Field(None, min_length=2, max_length=2,
                                               description="SDXL: [height, width]; default: the output size")
    target_size: Optional[list[Int]] = Field(None, min_length=2, max_length=2,
                                             description="SDXL: [height, width]; default: the output size")
    crops_coords_top_left: Optional[list[Int]] = Field(None, min_length=2, max_length=2,
                                                       description="SDXL: [top, left]; default [0, 0]")

    @model_validator(mode="before")
    @classmethod
    def old_names(cls, data):
        return renamed(data, GENERATE_ALIASES, cls.__name__)

    @model_validator(mode="after")
    def start_before_end(self):
        if self.adapter_start > self.adapter_end:  # named on adapter_start (a model validator's own loc is empty)
            error = PydanticCustomError("adapter_window", "adapter_start {start} is after adapter_end {end}: the "
                                        "adapter acts from adapter_start to adapter_end",
                                        {"start": self.adapter_start, "end": self.adapter_end})
            raise ValidationError.from_exception_data(type(self).__name__, [
                InitErrorDetails(type=error, loc=("adapter_start",), input=self.adapter_start)])
        return self

    @field_validator("guidance_scale", "instruct_guidance_scale", "image_guidance_scale",
                     "controlnet_conditioning_scale", "scale", "strength")
    @classmethod
    def bounded(cls, v, info):
        return v if v is None else within_bounds(v, info.field_name)

    @field_validator("original_size", "target_size", "crops_coords_top_left")
    @classmethod
    def size_pair(cls, v, info):
        low = 0 if info.field_name == "crops_coords_top_left" else 1
        if v is not None and any(x < low or x > 1 << 16 for x in v):
            raise ValueError(f"must be two integers from {low} to {1 << 16}")
        return v


class EditRequest(BaseModel):
    """POST /v1/edit: one request of `EditPipeline.__call__` (InstructPix2Pix), the names and defaults of
    `python -m engine edit`. `image` is the photo to edit; `ip_adapter_image` (old name `adapter_image`) the
    reference an adapter reads. No seed (or null): the server draws one and answers it."""
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=4096, description="the edit, e.g. 'make it winter'")
    negative_prompt: str = Field("", max_length=4096)
    image: Optional[str] = Field(None, description="the photo to edit: base64 or data:image/...;base64,...")
    ip_adapter_image: Optional[str] = Field(None, description="with an adapter: the reference image, base64 "
                                            "(old name: adapter_image)")
    instruct: Optional[str] = Field(None, max_length=4096, description="what to take from the reference")
    scale: float = Field(0.8, description="adapter strength (0 = plain InstructPix2Pix)")
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    num_inference_steps: Int = Field(100, ge=1, le=MAX_STEPS)
    seed: Optional[Int] = Field(None, ge=0, lt=2**63, description="default: a fresh random seed, answered")
    height: Optional[Int] = Field(None, ge=1, description="default: the photo's, rounded down to the VAE grid")
    width: Optional[Int] = Field(None, ge=1)
    num_images_per_prompt: Int = Field(1, ge=1, le=MAX_NUM_IMAGES, description="old name: num_images")
    scheduler: Literal[SCHEDULER_NAMES] = "default"  # type: ignore[valid-type]
    stream: bool = Field(False, description="server-sent events: progress, then result")

    @model_validator(mode="before")
    @classmethod
    def old_names(cls, data):
        return renamed(data, EDIT_ALIASES, cls.__name__)

    @field_validator("guidance_scale", "image_guidance_scale", "scale")
    @classmethod
    def bounded(cls, v, info):
        return within_bounds(v, info.field_name)


class Timings(BaseModel):
    model_config = ConfigDict(extra="allow")  # the pipeline's per-stage milliseconds of the batch come along
    queue_ms: float
    compute_ms: float
    batch_requests: int
    batch_rows: int


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="base64 PNG, num_images_per_prompt of them")
    seed: int = Field(description="the request's seed (drawn by the server when the request had none): sent back, "
                                  "it reproduces these images")
    seeds: list[int] = Field(description="each image's own seed, seed + j: sent back with num_images_per_prompt 1, "
                                         "it reproduces image j alone (its PNG's parameters carry it too)")
    timings: Timings
    request_id: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
    request_id: Optional[str] = None


class ModelParts(BaseModel):
    task: str
    adapters: list[dict] = Field(description="[{kind: instruct | plus | plain, name}]")
    controlnets: list[dict] = Field(description="[{kind: controlnet, name}]")
    loras: list[str]


class ModelCard(BaseModel):
    id: str
    base: str
    adapter: Optional[str]
    adapter_kind: Optional[str] = Field(description="instruct | plus | null (text to image)")
    image_encoder: Optional[str]
    dtype: str
    device: str
    attention_backend: str
    native_size: int
    vae_scale_factor: int
    schedulers: list[str]
    task: str = Field("generate", description="generate (POST /v1/generate) | edit (InstructPix2Pix, POST /v1/edit)")
    inpainting: bool = Field(False, description="an inpainting model (9-channel UNet): every request sends "
                                                "init_image and mask_image")
    # OpenAI's model object (client.models.list()), and what this server adds to it
    object: Literal["model"] = "model"
    created: int = Field(0, description="when this server loaded the model (Unix seconds)")
    owned_by: str = "ipadapter-instruct"
    ipadapter_instruct: Optional[ModelParts] = Field(None, description="the task and the loaded adapters, "
                                                     "ControlNets and LoRAs (their file or folder names)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
