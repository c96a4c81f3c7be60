"""Pydantic request/response schemas of the SAM-Med3D HTTP API (they appear in the OpenAPI docs at /docs)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, TypeAdapter

from raylearn.models.sam_med3d import Click
from raylearn.serve.config import MAX_CLICKS_HARD

#: a coordinate: a JSON number (no strings, no booleans), finite
Coord = Annotated[StrictFloat, Field(allow_inf_nan=False)]
Point = tuple[Coord, Coord, Coord]


class ClickIn(BaseModel):
    """One click. Give ``voxel`` = array index ``[d, h, w]`` (z, y, x; numpy / SimpleITK array order of the
    uploaded image, fractions allowed) or ``world`` = physical point ``[x, y, z]`` in mm (ITK/LPS)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"label": 1, "voxel": [18, 24, 17]}]})

    label: StrictInt = Field(..., ge=1, le=255, description="class the click belongs to (a key of /v1/info classes)")
    positive: StrictBool = Field(True, description="true: inside the object; false: background")
    voxel: Point | None = None
    world: Point | None = None

    def to_click(self) -> Click:
        return Click(label=self.label, positive=self.positive, voxel=self.voxel, world=self.world)

    @classmethod
    def from_click(cls, c: Click) -> ClickIn:
        """A click for a response (numpy scalars made plain Python numbers)."""
        point = lambda p: None if p is None else tuple(float(v) for v in p)  # noqa: E731
        return cls(label=int(c.label), positive=bool(c.positive), voxel=point(c.voxel), world=point(c.world))


ClickList = Annotated[list[ClickIn], Field(max_length=MAX_CLICKS_HARD)]


class ClicksRequest(BaseModel):
    """Body of ``POST /v1/sessions/{id}/clicks``."""

    model_config = ConfigDict(extra="forbid")

    clicks: ClickList = Field(..., description="new clicks; they are added to the session's earlier clicks")
    reset: StrictBool = Field(False, description="forget earlier clicks and masks of the classes clicked now")


CLICK_LIST = TypeAdapter(ClickList)
ROI_CENTER = TypeAdapter(Point)


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
    symdiff_pct: dict[int, dict[str, float]] | None = Field(
        None, description="pre-annotation with ground truth, per class: the P2P paper's 'NSD' (FP + FN) / |pred U gt| "
        "in % of SAM-Med3D's mask and of the segmenter's, and the gain (not normalised surface Dice)")
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
    version: str | None = Field(None, description="the weights' version (raylearn run publishes one per round)")
    encoder_digest: str | None = Field(None, description="digest of the image encoder's weights")


class InfoResponse(BaseModel):
    model: ModelInfo
    classes: dict[int, str]
    segmenter_checkpoint: str | None
    segmenter_checkpoint_sha256: str | None
    auth: bool = Field(..., description="bearer auth on: false means anyone who reaches the port may use the API")
    warnings: list[str] = Field(default_factory=list, description="configuration problems, e.g. auth off")
    limits: dict[str, float] = Field(default_factory=dict, description="upload, voxel and click caps")
    max_upload_mb: float
    session_ttl_s: float
    sessions: int
    encoder_requests: int = Field(..., description="encoder calls this ingress has made (embedding-cache misses)")
    decoder_requests: int


class ErrorResponse(BaseModel):
    """The body of every error (4xx and 5xx, 422 validation errors included)."""

    detail: str = Field(..., description="what was wrong, naming the field; never a server path")
