"""OpenAI-compatible speech gateway in front of Triton (FastAPI + uvicorn).

    f5-triton gateway --triton-url localhost:8001 --voices voices/ --port 8080

    from openai import OpenAI
    client = OpenAI(base_url="http://localhost:8080/v1", api_key="unused")
    client.audio.speech.create(model="f5-tts", voice="alice", input="Hello!", response_format="wav")

Routes (app.py): POST /v1/audio/speech, GET /v1/models, GET|POST /v1/voices, DELETE /v1/voices/{name},
GET /health, and GET / (static/index.html: a page to register voices and hear them). A voice is a
reference clip + transcript: voices/<name>.wav + voices/<name>.txt (voices.py). Non-streaming
requests go to the batching `f5_tts` ensemble, streaming ones (`"stream": true`) to
`f5_tts_streaming` (backend.py); audio is encoded as wav, pcm or mp3 (formats.py); errors are
OpenAI-style JSON (errors.py). Needs the `gateway` extra.
"""

from f5_triton.gateway.app import GatewayConfig, create_app

__all__ = ["GatewayConfig", "create_app"]
