"""Pydantic request/response schemas of the SAM-Med3D HTTP API (they appear in the OpenAPI docs at /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from raylearn.models.sam_med3d import Click


class ClickIn(BaseModel):
    """One click. Give ``voxel`` = array index ``[d, h, w]`` (z, y, x; numpy / SimpleITK array order of the
    uploaded image, fractions allowed) or ``world`` = physical point ``[x, y, z]`` in mm (ITK/LPS)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"label": 1, "voxel": [18, 24, 17]}]})

    label: int = Field(..., description="class the click belongs to (a key of /v1/info classes)")
    positive: bool = Field(True, description="true: inside the object; false: background")
    voxel: tuple[float, float, float] | None = None
    world: tuple[float, float, float] | None = None

    def to_click(self) -> Click:
        return Click(label=self.label, positive=self.positive, voxel=self.voxel, world=self.world)


class ClicksRequest(BaseModel):
    """Body of ``POST /v1/sessions/{id}/clicks``."""

    model_config = ConfigDict(extra="forbid")

    clicks: list[ClickIn] = Field(..., description="new clicks; they are added to the session's earlier clicks")
    reset: bool = Field(False, description="forget earlier clicks and masks of the classes clicked now")


CLICK_LIST = TypeAdapter(list[ClickIn])


class SessionInfo(BaseModel):
    """A click session: one uploaded volume whose embedding was computed once."""

    session_id: str
    shape: tuple[int, int, int] = Field(..., description="volume shape [D, H, W]")
    spacing: tuple[float, float, float] = Field(..., description="voxel spacing (x, y, z) in mm, ITK order")
    window_start: tuple[int, int, int] = Field(..., description="model window start on the 1.5 mm grid [d, h, w]")
    clicks: int
    classes_clicked: list[int]
    encoder_calls: int = Field(..., description="image-encoder passes spent on this session (1)")
    decoder_calls: int
    expires_in_s: float


class ClassStats(BaseModel):
    name: str
    voxels: int
    volume_ml: float


class MaskResponse(BaseModel):
    """A label map (``uint8 [D,H,W]``, C order, zlib-compressed then base64) on the uploaded image's grid."""

    shape: tuple[int, int, int]
    dtype: Literal["uint8"] = "uint8"
    encoding: Literal["zlib+base64"] = "zlib+base64"
    data: str
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    classes: dict[int, ClassStats]
    session_id: str | None = None
    clicks: list[ClickIn] | None = Field(None, description="the clicks used (pre-annotation: the simulated ones)")
    nsd: dict[int, dict[str, float]] | None = Field(
        None, description="pre-annotation with ground truth: NSD % of SAM-Med3D and of the segmenter per class")
    timing_ms: dict[str, float] = Field(default_factory=dict)


class ModelInfo(BaseModel):
    model: str
    preset: str
    architecture: dict
    parameters: int
    checkpoint: str | None
    checkpoint_sha256: str | None
    input_size: int
    target_spacing_mm: float
    device: str
    batching: dict
    encoder_calls: int = Field(..., description="windows encoded by the replica that answered")
    decoder_calls: int


class InfoResponse(BaseModel):
    model: ModelInfo
    classes: dict[int, str]
    segmenter_checkpoint: str | None
    segmenter_checkpoint_sha256: str | None
    auth: bool
    max_upload_mb: float
    session_ttl_s: float
    sessions: int
    encoder_requests: int = Field(..., description="encoder calls this ingress has made (embedding-cache misses)")
    decoder_requests: int


class ErrorResponse(BaseModel):
    detail: str
