"""The FastAPI application: OpenAI's `POST /v1/audio/speech` in front of Triton, plus voice management.

Request body of /v1/audio/speech (OpenAI's fields, then ours):
  model            one of `GatewayConfig.model_names` (OpenAI's names are accepted as aliases)
  input            the text to speak (the server's byte limit applies)
  voice            a registered voice name, or {"id": name}
  response_format  wav | pcm | mp3 (mp3 when lameenc is installed); default mp3, as OpenAI
  speed            speaking rate, 1.0 = the reference's pace (the server's range applies)
  stream           true: audio is sent while it is generated, from `f5_tts_streaming`
  volume           gain applied before encoding (clipped to full scale), default 1.0
  seed             noise seed, for reproducible audio (and the server's output cache)
`instructions` and `stream_format: "sse"` are not supported (400).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, FastAPI, File, Form, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from f5_triton.config import DEFAULT_SERVER
from f5_triton.errors import InvalidInputError
from f5_triton.gateway import errors, formats
from f5_triton.gateway.backend import TritonBackend
from f5_triton.gateway.errors import APIError
from f5_triton.gateway.voices import UnknownVoice, Voice, VoiceRegistry

PAGE = Path(__file__).with_name("static") / "index.html"
UPLOAD_FIELDS = {"reference_wav": "audio", "sample_rate": "audio", "reference_text": "transcript", "name": "name"}


@dataclass
class GatewayConfig:
    triton_url: str = f"localhost:{DEFAULT_SERVER.grpc_port}"  # gRPC host:port
    voices_dir: Path = Path("voices")
    model: str = "f5_tts"
    streaming_model: str = "f5_tts_streaming"
    model_names: tuple[str, ...] = ("f5-tts", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
    timeout: float | None = 300.0  # seconds for a whole request, or for each streamed piece
    allow_upload: bool = True  # POST/DELETE /v1/voices
    max_upload_bytes: int = 16 * 2**20
    api_key: str | None = None  # when set, requests need "Authorization: Bearer <api_key>"


class VoiceId(BaseModel):
    id: str


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str
    voice: str | VoiceId
    response_format: str = "mp3"
    speed: float = 1.0
    stream: bool = False
    instructions: str | None = None
    stream_format: str | None = None
    volume: float = Field(1.0, ge=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    @property
    def voice_name(self) -> str:
        return self.voice if isinstance(self.voice, str) else self.voice.id


def _check_request(body: SpeechRequest, config: GatewayConfig) -> None:
    if body.model not in config.model_names:
        raise APIError(404, f"model {body.model!r} does not exist; available: {', '.join(config.model_names)}",
                       param="model", code="model_not_found")
    supported = formats.supported_formats()
    if body.response_format not in supported:
        raise APIError(400, f"response_format {body.response_format!r} is not supported; supported: "
                       f"{', '.join(supported)}", param="response_format", code="unsupported_value")
    if body.instructions:
        raise APIError(400, "instructions are not supported: F5-TTS takes the voice from the reference clip",
                       param="instructions", code="unsupported_parameter")
    if body.stream_format not in (None, "audio"):
        raise APIError(400, f"stream_format {body.stream_format!r} is not supported; use \"audio\" with "
                       "\"stream\": true", param="stream_format", code="unsupported_value")


def _audio_stream(pieces: Iterator[np.ndarray], first: np.ndarray, encoder: formats.Encoder) -> Iterator[bytes]:
    try:
        yield encoder.start() + encoder.encode(first)
        for piece in pieces:
            yield encoder.encode(piece)
        yield encoder.finish()
    finally:
        pieces.close()  # a client that went away cancels the Triton request


class FrontDoor:
    """Pure ASGI, before anything reads the body: requests under /v1 need `Authorization: Bearer <api_key>` (when one
    is set), checked from the headers alone (FastAPI reads a body before it runs dependencies: a dependency would come
    too late); a body declared larger than `max_body` is refused (413) unread. Bodies that do not declare their size
    (chunked) are counted as they stream in, behind this door (Starlette's RequestBodyLimitMiddleware)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int):
        self.app = app
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            refusal = None
            if self.expected is not None and scope["path"].startswith("/v1") and not hmac.compare_digest(
                    headers.get("authorization", "").encode(), self.expected):
                refusal = APIError(401, "missing or wrong API key (Authorization: Bearer ...)",
                                   type=errors.AUTHENTICATION, code="invalid_api_key")
            elif headers.get("content-length", "").isdigit() and int(headers["content-length"]) > self.max_body:
                refusal = errors.too_large(self.max_body)
            if refusal is not None:
                return await refusal.response()(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(config: GatewayConfig, backend: TritonBackend | None = None) -> FastAPI:
    """The gateway application for `config` (`backend` defaults to gRPC at `config.triton_url`)."""
    backend = backend or TritonBackend(config.triton_url, config.model, config.streaming_model, config.timeout)
    voices = VoiceRegistry(config.voices_dir)

    def find_voice(name: str) -> Voice:
        try:
            return voices.get(name)
        except UnknownVoice as exc:
            raise APIError(400, str(exc), param="voice", code="voice_not_found") from None
        except InvalidInputError as exc:
            raise errors.from_invalid_input(exc, {"voice": "voice", "reference_audio": "voice"}) from None

    def check_uploads_allowed() -> None:
        if not config.allow_upload:
            raise APIError(403, "voice upload is disabled on this gateway", type=errors.INVALID_REQUEST,
                           code="forbidden")

    app = FastAPI(title="f5-triton gateway", description="OpenAI-compatible speech API over Triton")
    errors.install(app)
    # Every body, chunked or not, is bounded by an upload and its form fields: nothing larger is ever buffered (413,
    # the limit named). The door (added last: outermost) answers from the headers; behind it bodies are counted.
    max_body = config.max_upload_bytes + 2**16
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=max_body)
    app.add_middleware(FrontDoor, api_key=config.api_key, max_body=max_body)
    app.state.config, app.state.backend, app.state.voices = config, backend, voices
    api = APIRouter(prefix="/v1")

    @api.post("/audio/speech")
    def speech(body: SpeechRequest) -> Response:
        _check_request(body, config)
        voice = find_voice(body.voice_name)
        optional = {"speed": body.speed, "seed": body.seed}
        media_type = formats.CONTENT_TYPES[body.response_format]
        if not body.stream:
            wave = backend.synthesize(voice, body.input, **optional)
            return Response(formats.encode(body.response_format, wave, body.volume), media_type=media_type)
        pieces = backend.stream(voice, body.input, **optional)
        # the first piece is awaited here, so that bad input still gets its status code and JSON error
        first = next(pieces, np.zeros(0, dtype=np.float32))
        encoder = formats.encoder(body.response_format, body.volume)
        return StreamingResponse(_audio_stream(pieces, first, encoder), media_type=media_type)

    @api.get("/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "f5-triton"}
                                           for name in config.model_names]}

    @api.get("/voices")
    def list_voices() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "voice"} for name in voices.names()]}

    @api.post("/voices", status_code=201)
    def upload_voice(name: Annotated[str, Form()], transcript: Annotated[str, Form()],
                     audio: Annotated[UploadFile, File()]) -> dict:
        check_uploads_allowed()
        data = audio.file.read(config.max_upload_bytes + 1)
        if len(data) > config.max_upload_bytes:
            raise APIError(413, f"audio is larger than {config.max_upload_bytes} bytes", param="audio",
                           code="too_large")
        try:
            voice = voices.add(name, data, transcript)
        except FileExistsError as exc:
            raise APIError(409, str(exc), param="name", code="voice_exists") from None
        except InvalidInputError as exc:
            raise errors.from_invalid_input(exc, UPLOAD_FIELDS) from None
        return {"id": voice.name, "object": "voice", "seconds": round(voice.seconds, 3),
                "sample_rate": voice.sample_rate, "transcript": voice.transcript}

    @api.delete("/voices/{name}")
    def delete_voice(name: str) -> dict:
        check_uploads_allowed()
        try:
            voices.delete(name)
        except UnknownVoice as exc:
            raise APIError(404, str(exc), type=errors.NOT_FOUND, param="name", code="voice_not_found") from None
        except InvalidInputError as exc:
            raise errors.from_invalid_input(exc, {"voice": "name"}) from None
        return {"id": name, "object": "voice", "deleted": True}

    @app.get("/health")  # no API key: for load balancers
    def health() -> JSONResponse:
        ready = backend.ready()
        body = {"status": "ok" if ready else "triton not ready"}
        if ready:
            body["random_weights"] = backend.random_weights()
        return JSONResponse(body, status_code=200 if ready else 503)

    page = PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)  # the page asks for the key itself
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    app.include_router(api)
    return app
