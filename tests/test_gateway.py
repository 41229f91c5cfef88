"""The OpenAI-compatible gateway, called with the official `openai` client, in front of the real server."""

from __future__ import annotations

import http.client
import io
import json
import shutil
import struct
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import soundfile as sf

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.server

REF_TEXT = "Some call me nature, others call me mother nature."
TEXT = "Hello from the gateway. It speaks two sentences."
API_KEY = "test-key"
QUANTUM = 1 / 32767  # 16-bit output


@pytest.fixture(scope="module")
def gateway(streaming_server, run_gateway, tmp_path_factory, ref_en):
    """The gateway on a free port, with an API key; one voice, "nature", in its voices folder."""
    from f5_triton.gateway import GatewayConfig

    voices = tmp_path_factory.mktemp("voices")
    shutil.copyfile(ref_en, voices / "nature.wav")
    (voices / "nature.txt").write_text(REF_TEXT + "\n")
    config = GatewayConfig(triton_url=streaming_server.urls.grpc, voices_dir=voices, timeout=120, api_key=API_KEY,
                           max_upload_bytes=2 * 2**20)
    with run_gateway(config) as url:
        yield url


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ref_wave(ref_en):
    wave, _ = sf.read(ref_en, dtype="float32")
    return wave


def pcm16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767


def error_of(exc_info) -> dict:
    return exc_info.value.response.json()["error"]


def test_speech_wav_is_the_f5_tts_result(client, streaming_server, ref_wave):
    from f5_triton.client import synthesize

    response = client.audio.speech.create(model="tts-1", voice="nature", input=TEXT, response_format="wav",
                                          speed=1.2, extra_body={"seed": 7})
    assert response.response.headers["content-type"] == "audio/wav"
    wave, rate = sf.read(io.BytesIO(response.content), dtype="float32")
    assert rate == 24000 and sf.info(io.BytesIO(response.content)).subtype == "PCM_16"
    expected = synthesize(streaming_server.urls.grpc, ref_wave, REF_TEXT, TEXT, seed=7, speed=1.2)
    assert wave.shape == expected.shape
    assert np.abs(wave - np.clip(expected, -1, 1)).max() <= QUANTUM


def test_speech_default_mp3_and_volume(client):
    pcm = client.audio.speech.create(model="f5-tts", voice={"id": "nature"}, input=TEXT, response_format="pcm",
                                     extra_body={"seed": 8}).content
    quiet = client.audio.speech.create(model="f5-tts", voice="nature", input=TEXT, response_format="pcm",
                                       extra_body={"seed": 8, "volume": 0.5}).content
    assert len(pcm) == len(quiet) and len(pcm) % 2 == 0
    assert np.abs(pcm16(quiet) - np.clip(pcm16(pcm) * 0.5, -0.5, 0.5)).max() <= 2 * QUANTUM
    mp3 = client.audio.speech.create(model="f5-tts", voice="nature", input=TEXT, extra_body={"seed": 8})
    assert mp3.response.headers["content-type"] == "audio/mpeg"
    decoded, rate = sf.read(io.BytesIO(mp3.content), dtype="float32")
    assert rate == 24000 and abs(len(decoded) - len(pcm) // 2) < 24000 * 0.1  # mp3 pads by a frame or two


def test_streaming_pcm_and_wav(client, streaming_server, ref_wave):
    from f5_triton.client import stream_synthesize

    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="nature", input=TEXT, response_format="pcm",
            extra_body={"stream": True, "seed": 9}) as response:
        assert response.headers["content-type"] == "audio/pcm"
        assert "content-length" not in response.headers  # chunked: sent while generated
        parts = list(response.iter_bytes())
    streamed = pcm16(b"".join(parts))
    direct = np.concatenate(list(stream_synthesize(streaming_server.urls.grpc, ref_wave, REF_TEXT, TEXT, seed=9,
                                                   speed=1.0, timeout=120)))
    assert streamed.shape == direct.shape
    assert np.abs(streamed - np.clip(direct, -1, 1)).max() <= QUANTUM

    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="nature", input=TEXT, response_format="wav",
            extra_body={"stream": True, "seed": 9}) as response:
        data = response.read()
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt " and data[36:40] == b"data"
    assert struct.unpack("<I", data[40:44])[0] == 0xFFFFFFFF  # a stream does not know its length
    assert data[44:] == b"".join(parts)


@pytest.mark.parametrize("overrides, status, param, words", [
    ({"voice": "nobody"}, 400, "voice", "no voice named 'nobody'"),
    ({"voice": "../etc"}, 400, "voice", "not a voice name"),
    ({"response_format": "opus"}, 400, "response_format", "supported: wav, pcm, mp3"),
    ({"model": "whisper-1"}, 404, "model", "does not exist"),
    ({"speed": 5.0}, 400, "speed", "speed: is 5.0; allowed range is [0.3, 3.0]"),
    ({"speed": 5.0, "extra_body": {"stream": True}}, 400, "speed", "allowed range"),
    ({"input": "x" * 2001}, 400, "input", "input: is 2001 bytes; the limit is 2000 bytes"),
    ({"input": "\x00\x01\x02\x03"}, 400, "input", "input: is empty, or only whitespace and control characters"),
    ({"instructions": "whisper"}, 400, "instructions", "not supported"),
    ({"extra_body": {"volume": -1}}, 400, "volume", "greater than or equal to 0"),
])
def test_errors_are_openai_shaped(client, overrides, status, param, words):
    request = {"model": "tts-1", "voice": "nature", "input": "Short.", "response_format": "wav", **overrides}
    with pytest.raises(openai.APIStatusError) as caught:
        client.audio.speech.create(**request)
    assert caught.value.status_code == status
    error = error_of(caught)
    assert error["param"] == param and words in error["message"]
    assert error["type"] == "invalid_request_error"


def test_wrong_api_key_is_401(gateway):
    other = openai.OpenAI(base_url=f"{gateway}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        other.audio.speech.create(model="tts-1", voice="nature", input="Hi.")
    assert error_of(caught)["type"] == "authentication_error"


def multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b""
    for name, value in fields.items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, data in files.items():
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.wav"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def call(gateway, method, path, body=None, content_type=None):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(f"{gateway}{path}", data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_voice_upload_use_and_delete(gateway, client, ref_en, ref_wave):
    clip = io.BytesIO()
    sf.write(clip, ref_wave[::2], 12000, format="FLAC")  # any format soundfile reads, any rate in the limits
    body, kind = multipart({"name": "uploaded", "transcript": REF_TEXT}, {"audio": clip.getvalue()})
    status, created = call(gateway, "POST", "/v1/voices", body, kind)
    assert status == 201 and created["id"] == "uploaded" and created["sample_rate"] == 12000
    assert call(gateway, "POST", "/v1/voices", body, kind)[0] == 409
    assert {"nature", "uploaded"} <= {v["id"] for v in call(gateway, "GET", "/v1/voices")[1]["data"]}

    wav = client.audio.speech.create(model="tts-1", voice="uploaded", input="New voice.", response_format="wav")
    assert len(sf.read(io.BytesIO(wav.content))[0]) > 0

    for fields, files, param in (({"name": "bad/name", "transcript": "x"}, {"audio": clip.getvalue()}, "name"),
                                 ({"name": "noise", "transcript": "x"}, {"audio": b"not audio at all"}, "audio"),
                                 ({"name": "quiet", "transcript": "x"}, {"audio": silent_wav()}, "audio"),
                                 ({"name": "mute", "transcript": "  "}, {"audio": clip.getvalue()}, "transcript")):
        status, answer = call(gateway, "POST", "/v1/voices", *multipart(fields, files))
        assert status == 400 and answer["error"]["param"] == param, answer
        if param == "audio" and fields["name"] == "noise":
            assert "wav, flac, ogg or mp3" in answer["error"]["message"]
    big, kind = multipart({"name": "big", "transcript": "x"}, {"audio": b"0" * (2 * 2**20 + 1)})
    assert call(gateway, "POST", "/v1/voices", big, kind)[0] == 413

    assert call(gateway, "DELETE", "/v1/voices/uploaded")[0] == 200
    status, answer = call(gateway, "DELETE", "/v1/voices/uploaded")
    assert status == 404 and answer["error"]["code"] == "voice_not_found"


def silent_wav() -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros(24000, dtype=np.float32), 24000, format="WAV")
    return out.getvalue()


def test_models_health_and_unknown_routes(gateway):
    status, models = call(gateway, "GET", "/v1/models")
    assert status == 200 and "tts-1" in {m["id"] for m in models["data"]}
    with urllib.request.urlopen(f"{gateway}/health", timeout=10) as response:  # no API key needed
        assert json.load(response) == {"status": "ok", "random_weights": True}  # the tiny checkpoint
    status, answer = call(gateway, "GET", "/v1/nothing")
    assert status == 404 and answer["error"]["type"] == "not_found_error"
    # an oversized body is refused from its Content-Length, before it is read (none is sent here)
    connection = http.client.HTTPConnection(gateway.removeprefix("http://"), timeout=10)
    connection.putrequest("POST", "/v1/audio/speech")
    for header, value in (("Authorization", f"Bearer {API_KEY}"), ("Content-Type", "application/json"),
                          ("Content-Length", str(10**9))):
        connection.putheader(header, value)
    connection.endheaders()
    response = connection.getresponse()
    error = json.load(response)["error"]
    assert response.status == 413 and error["code"] == "too_large" and "the gateway's limit of" in error["message"]
    connection.close()


def test_key_and_body_limit_come_before_the_body(tmp_path):
    """A chunked body is bounded as it streams in: keyless, 401 before the body is read; keyed, 413 naming the limit
    once it is passed; the gateway process (a real `f5-triton gateway`) keeps its memory through 64 MB sent."""
    import os
    import select
    import socket
    import subprocess
    import sys
    import time

    psutil = pytest.importorskip("psutil")
    from f5_triton.gateway import GatewayConfig
    from f5_triton.supervisor.server import free_port

    port, total, limit = free_port(), 64 * 2**20, GatewayConfig.max_upload_bytes + 2**16
    gateway = subprocess.Popen([sys.executable, "-m", "f5_triton.cli", "gateway", "--triton-url", "127.0.0.1:1",
                                "--port", str(port), "--voices", str(tmp_path), "--log-level", "warning"],
                               env={**os.environ, "F5_TRITON_GATEWAY_KEY": API_KEY})

    def send_chunked(headers: str) -> tuple[int, int, dict]:
        """(bytes sent before the gateway answered or stopped reading, its status, its JSON error)."""
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(f"POST /v1/audio/speech HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                         f"Transfer-Encoding: chunked\r\n{headers}\r\n".encode())
            chunk, sent = b"x" * 2**20, 0
            try:
                while sent < total and not select.select([sock], [], [], 0)[0]:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
            except OSError:  # the gateway closed the connection after answering
                pass
            answer = http.client.HTTPResponse(sock)
            answer.begin()
            return sent, answer.status, json.loads(answer.read())["error"]

    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert gateway.poll() is None and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.1)
        before = psutil.Process(gateway.pid).memory_info().rss
        sent, status, error = send_chunked("")
        assert status == 401 and error["code"] == "invalid_api_key", error
        assert sent < limit, sent  # answered from the headers, not after reading the body
        sent, status, error = send_chunked(f"Authorization: Bearer {API_KEY}\r\n")
        assert status == 413 and error["code"] == "too_large", error
        assert f"the gateway's limit of {limit} bytes" in error["message"]
        assert limit < sent < total  # read up to the limit, no further
        growth = psutil.Process(gateway.pid).memory_info().rss - before
        assert growth < limit + 16 * 2**20, growth / 2**20
    finally:
        gateway.terminate()
        gateway.wait(30)


def test_messages_name_the_field_and_the_limit(run_gateway, tmp_path, ref_wave):
    """Refusals that need no Triton, from a gateway whose Triton is unreachable: bad JSON is not a field, and a
    sample rate is called one."""
    from f5_triton.config import DEFAULT_LIMITS
    from f5_triton.gateway import GatewayConfig

    with run_gateway(GatewayConfig(triton_url="127.0.0.1:1", voices_dir=tmp_path)) as url:
        broken = b'{"model": "tts-1",, "input": "Hi."}'
        status, answer = call(url, "POST", "/v1/audio/speech", broken, "application/json")
        assert status == 400 and answer["error"]["param"] is None and answer["error"]["code"] == "invalid_json"
        assert answer["error"]["message"].startswith("the request body is not valid JSON: ")
        assert answer["error"]["message"].endswith(f" at character {broken.index(b',,') + 2}"), answer  # the 2nd comma

        clip = io.BytesIO()
        sf.write(clip, ref_wave[::6], 4000, format="WAV")
        status, answer = call(url, "POST", "/v1/voices",
                              *multipart({"name": "slow", "transcript": REF_TEXT}, {"audio": clip.getvalue()}))
        assert status == 400 and answer["error"]["param"] == "audio"
        assert answer["error"]["message"] == (f"audio: sample rate 4000 Hz is outside the allowed range "
                                              f"[{DEFAULT_LIMITS.min_sample_rate}, {DEFAULT_LIMITS.max_sample_rate}] Hz")


def test_unreachable_triton_is_503(ref_wave):
    from f5_triton.gateway.backend import TritonBackend
    from f5_triton.gateway.errors import APIError
    from f5_triton.gateway.voices import Voice

    backend = TritonBackend("127.0.0.1:1", timeout=10)
    voice = Voice("v", ref_wave, 24000, REF_TEXT)
    for call_backend in (lambda: backend.synthesize(voice, "Hi."), lambda: next(backend.stream(voice, "Hi."))):
        with pytest.raises(APIError) as caught:
            call_backend()
        assert caught.value.status == 503 and caught.value.type == "service_unavailable_error"
    assert not backend.ready()


def test_unknown_voice_says_how_to_register_one(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.", response_format="wav")
    assert "POST /v1/voices" in error_of(caught)["message"]


def test_triton_refuses_control_character_text(streaming_server, ref_wave):
    """Only control characters is nothing to speak: Triton answers 400 naming the field, as the gateway does."""
    from tritonclient.utils import InferenceServerException

    from f5_triton.client import synthesize

    for protocol, url in (("grpc", streaming_server.urls.grpc), ("http", streaming_server.urls.http_hostport)):
        with pytest.raises(InferenceServerException, match="target_text: is empty, or only whitespace and control"):
            synthesize(url, ref_wave, REF_TEXT, "\x00\x01\x02\x03", protocol=protocol)


def test_page_is_served(gateway):
    with urllib.request.urlopen(f"{gateway}/", timeout=10) as response:  # no API key: the page asks for it
        assert response.headers["content-type"].startswith("text/html")
        assert b'id="speak"' in response.read()
