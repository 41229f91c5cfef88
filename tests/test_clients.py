"""client_http.py / client_grpc.py as a user meets them: the server's refusal in one line, latency and RTF,
and the warning that a server with random weights makes noise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
REF_TEXT = "Some call me nature, others call me mother nature."


def client(script: str, url: str, ref: Path, text: str, output: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), "--server-url", url, "--reference-audio", str(ref),
                           "--reference-text", REF_TEXT, "--target-text", text, "--nfe-steps", "4",
                           "--output-audio", str(output)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", ["client_http.py", "client_grpc.py"])
def test_refused_request_is_one_line(streaming_server, ref_en, tmp_path, script):
    url = streaming_server.urls.http_hostport if script == "client_http.py" else streaming_server.urls.grpc
    result = client(script, url, ref_en, "   ", tmp_path / "never.wav")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{script}: error: target_text: is empty, or only whitespace and control characters"]
    assert not (tmp_path / "never.wav").exists()


def test_unreachable_server_is_one_line(ref_en, tmp_path):
    from f5_triton.supervisor.server import free_port

    result = client("client_http.py", f"127.0.0.1:{free_port()}", ref_en, "Hello.", tmp_path / "never.wav")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("client_http.py: error: ")


def test_unreadable_reference_names_the_formats_read(tmp_path):
    from f5_triton.supervisor.server import free_port

    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio" * 100)
    result = client("client_grpc.py", f"127.0.0.1:{free_port()}", garbage, "Hello.", tmp_path / "never.wav")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert f"cannot read {garbage} as wav, flac, ogg or mp3 audio" in result.stderr


def test_success_prints_latency_rtf_and_the_random_weights_warning(streaming_server, ref_en, tmp_path):
    import re

    import soundfile as sf

    out = tmp_path / "sub" / "out.wav"  # its folder is made
    result = client("client_grpc.py", streaming_server.urls.grpc, ref_en, "Hello there.", out)
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(rf"wrote {re.escape(str(out))}: ([\d.]+) s of audio in ([\d.]+) s \(RTF ([\d.]+)\)\n",
                         result.stdout)
    assert match, result.stdout
    seconds, latency, rtf = map(float, match.groups())
    assert seconds == pytest.approx(len(sf.read(out)[0]) / 24000, abs=0.01)
    assert rtf == pytest.approx(latency / seconds, rel=0.05, abs=0.002)
    assert "RANDOM WEIGHTS" in result.stderr and "noise, not speech" in result.stderr
