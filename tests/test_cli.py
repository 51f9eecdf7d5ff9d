"""The CLI through ``main(argv)`` against a running service, and ``serve`` as a real process."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from bridge import __version__
from bridge.cli import main
from bridge.events import invite_facts
from bridge.recordings import recording_path
from bridge.service import Service
from tests.conftest import API_KEY, recorded_call
from tests.fake_pbx import FakePbx
from tests.pipeline_server import PipelineServer
from tests.test_store import corrupt_calls_table, filled_store


async def run(
    service: Service | None, *argv: str, stdin: str | None = None
) -> tuple[int, str, str]:
    """Runs the CLI in a thread (it is synchronous) so the service keeps serving."""
    out, err = io.StringIO(), io.StringIO()
    args = list(argv)
    if service is not None:
        args = ["--url", f"http://127.0.0.1:{service.api_port}", "--api-key", API_KEY, *args]

    def call() -> int:
        if stdin is not None:
            saved, sys.stdin = sys.stdin, io.StringIO(stdin)
            try:
                return main(args, out, err)
            finally:
                sys.stdin = saved
        return main(args, out, err)

    code = await asyncio.to_thread(call)
    return code, out.getvalue(), err.getvalue()


async def test_version_and_usage_errors() -> None:
    assert await run(None, "version") == (0, f"sipbridge {__version__}\n", "")
    code, _, err = await run(None, "frobnicate")
    assert code == 2 and "invalid choice" in err
    code, _, err = await run(None, "assistant")
    assert code == 2


async def test_assistant_commands(service: Service) -> None:
    code, out, err = await run(
        service,
        "assistant",
        "create",
        "--name",
        "Support",
        "--first-message",
        "Hello {{first_name}}, you've reached me over SIP.",
        "--system-prompt",
        "You are helpful.",
        "--pipeline-url",
        "ws://127.0.0.1:9/pipe",
        "--pipeline-format",
        "twilio",
    )
    assert code == 0, err
    assistant_id = re.fullmatch(r"created assistant (\S+)\n", out).group(1)  # type: ignore[union-attr]
    stored = await service.resources.get("assistant", assistant_id)
    assert stored["model"] == {"messages": [{"role": "system", "content": "You are helpful."}]}
    assert stored["sipbridge"] == {"pipeline": {"url": "ws://127.0.0.1:9/pipe", "format": "twilio"}}

    code, out, _ = await run(service, "assistant", "list")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["ID", "NAME", "FIRST", "MESSAGE", "PIPELINE"]
    assert row.startswith(assistant_id) and "Support" in row

    code, out, _ = await run(service, "--json", "assistant", "show", assistant_id)
    assert code == 0 and json.loads(out)["name"] == "Support"
    code, out, _ = await run(
        service, "assistant", "update", assistant_id, "--max-duration", "120", "--json"
    )
    assert code == 0 and json.loads(out)["maxDurationSeconds"] == 120
    code, _, err = await run(service, "assistant", "update", assistant_id)
    assert code == 2 and "nothing to update" in err
    code, _, err = await run(service, "assistant", "update", assistant_id, "--max-duration", "1")
    assert (
        code == 1
        and err.startswith("sipbridge: HTTP 400: maxDurationSeconds:")
        and err.count("\n") == 1
    )
    assert await run(service, "assistant", "delete", assistant_id) == (
        0,
        f"deleted assistant {assistant_id}\n",
        "",
    )
    code, _, err = await run(service, "assistant", "show", assistant_id)
    assert code == 1 and "HTTP 404" in err


async def test_number_commands_and_files(service: Service, tmp_path: Path) -> None:
    assistant = await service.resources.create("assistant", {"name": "A"})
    body = tmp_path / "number.json"
    body.write_text(
        json.dumps({"sipUri": "sip:alice@sip.example.com", "name": "From file", "hooks": []})
    )
    code, out, err = await run(
        service,
        "number",
        "create",
        "--file",
        str(body),
        "--assistant-id",
        assistant["id"],
        "--name",
        "Alice",
    )
    assert code == 0, err
    number_id = out.split()[-1]
    stored = await service.resources.get("phone_number", number_id)
    assert (
        stored["name"] == "Alice"
        and stored["assistantId"] == assistant["id"]
        and stored["hooks"] == []
    )

    code, _, _ = await run(
        service,
        "number",
        "update",
        number_id,
        "--assistant-id",
        "none",
        "--server-url",
        "https://hooks.example.com/a",
        "--server-secret",
        "s3cret",
        "--fallback-sip-uri",
        "sip:operator@pbx.example.com",
    )
    assert code == 0
    stored = await service.resources.get("phone_number", number_id)
    assert "assistantId" not in stored
    assert stored["server"] == {"url": "https://hooks.example.com/a", "secret": "s3cret"}
    assert stored["fallbackDestination"] == {
        "type": "sip",
        "sipUri": "sip:operator@pbx.example.com",
    }

    code, out, _ = await run(service, "number", "list")
    assert "sip:alice@sip.example.com" in out and "https://hooks.example.com/a" in out
    code, out, _ = await run(service, "--json", "number", "list")
    assert [n["id"] for n in json.loads(out)] == [number_id]

    code, out, err = await run(
        service, "number", "create", "--file", "-", stdin='{"sipUri": "sip:bob@x"}'
    )
    assert code == 0, err
    code, _, err = await run(service, "number", "create", "--file", str(tmp_path / "missing.json"))
    assert code == 2 and "cannot read" in err
    (tmp_path / "bad.json").write_text("{nope")
    code, _, err = await run(service, "number", "create", "--file", str(tmp_path / "bad.json"))
    assert code == 2 and "not valid JSON" in err


async def test_call_commands(service: Service, pipeline: PipelineServer) -> None:
    assistant = await service.resources.create(
        "assistant", {"name": "A", "sipbridge": {"pipeline": {"url": pipeline.url}}}
    )
    await service.resources.create(
        "phone_number", {"sipUri": "sip:alice@x", "assistantId": assistant["id"]}
    )
    pbx = FakePbx()
    facts = invite_facts(
        pbx="test",
        pbx_call_id="p1",
        channel="c",
        request_user="alice",
        request_host="x",
        from_number="+1555",
    )
    call = service.callflow.offer(facts, pbx)
    assert call is not None
    await pbx.wait_for("connect_media")
    code, out, _ = await run(service, "calls", "--active")
    assert code == 0 and call.id in out and "in-progress" in out
    code, out, _ = await run(service, "--json", "call", "show", call.id)
    assert json.loads(out)["status"] == "in-progress"
    code, out, _ = await run(service, "call", "hangup", call.id)
    assert (code, out) == (0, f"hung up call {call.id} (manually-canceled)\n")
    code, _, err = await run(service, "call", "hangup", call.id)
    assert code == 1 and "is not active" in err
    code, out, _ = await run(service, "calls", "--active")
    assert out == "(none)\n"
    code, out, _ = await run(service, "calls")
    assert "manually-canceled" in out
    await service.recorder.flush()
    code, out, _ = await run(service, "call", "delete", call.id)
    assert (code, out) == (0, f"deleted call {call.id} (its record and recordings)\n")
    code, _, err = await run(service, "call", "show", call.id)
    assert code == 1 and "not found" in err.lower()


async def test_call_create_places_an_outbound_call(
    service: Service, pipeline: PipelineServer
) -> None:
    assistant = await service.resources.create(
        "assistant", {"name": "A", "sipbridge": {"pipeline": {"url": pipeline.url}}}
    )
    number = await service.resources.create(
        "phone_number", {"sipUri": "sip:100@x", "assistantId": assistant["id"]}
    )
    pbx = FakePbx(kind="asterisk")
    service.backends["asterisk"] = pbx  # type: ignore[assignment]
    placed: list[str] = []
    try:
        code, out, err = await run(
            service,
            "--json",
            "call",
            "create",
            "--assistant",
            assistant["id"],
            "--number",
            number["id"],
            "--to",
            "sip:bob@example.org",
            "--name",
            "Bob",
            "--var",
            "first_name=Bob",
            "--header",
            "X-Campaign=spring",
        )
        assert code == 0, err
        call = json.loads(out)
        placed.append(call["id"])
        assert (call["type"], call["customer"]) == (
            "outboundPhoneCall",
            {"name": "Bob", "sipUri": "sip:bob@example.org"},
        )
        assert call["assistantOverrides"]["variableValues"]["first_name"] == "Bob"
        _, dial = await pbx.wait_for("originate")
        assert dial.headers == (("X-Campaign", "spring"),)
        code, _, err = await run(
            service,
            "call",
            "create",
            "--assistant",
            "a",
            "--number",
            "n",
            "--to",
            "+1",
            "--var",
            "x",
        )
        assert code == 2 and "--var 'x' is not NAME=VALUE" in err
    finally:
        for call_id in placed:
            await service.callflow.hangup(call_id)
        service.backends.pop("asterisk")


async def test_unreachable_service_is_one_line() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    code, out, err = await run(None, "--url", f"http://127.0.0.1:{port}", "assistant", "list")
    assert code == 1 and out == ""
    assert (
        err.startswith(f"sipbridge: cannot reach sipbridge at http://127.0.0.1:{port}")
        and err.count("\n") == 1
    )


async def test_health_is_the_images_healthcheck(service: Service) -> None:
    code, out, _ = await run(service, "health")
    assert (code, out) == (0, "ok: store ok; no PBX\n")
    service.pbx_links["asterisk"] = False  # a PBX link down: 503, and the check fails
    code, out, err = await run(service, "health")
    assert code == 1 and out == "" and "HTTP 503" in err
    service.pbx_links["asterisk"] = True
    code, out, _ = await run(service, "--json", "health")
    assert code == 0 and json.loads(out)["pbx"] == {"asterisk": "up"}


async def test_lab_call_says_when_there_is_no_sipbridge(tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    code, out, _ = await run(
        None, "--url", f"http://127.0.0.1:{port}", "lab-call", "--sip", "127.0.0.1:9",
        "--state-dir", str(tmp_path),
    )  # fmt: skip
    assert code == 1 and f"cannot reach sipbridge at http://127.0.0.1:{port}" in out


async def test_a_bad_url_is_a_usage_error() -> None:
    code, out, err = await run(None, "--url", "notaurl", "assistant", "list")
    assert (code, out) == (2, "")
    assert err.startswith("sipbridge: --url 'notaurl'") and err.count("\n") == 1


async def test_config_show_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIPBRIDGE_API__KEY", API_KEY)
    monkeypatch.setenv("SIPBRIDGE_FREESWITCH__PASSWORD", "ClueCon")
    code, out, _ = await run(None, "config", "show")
    assert code == 0
    assert API_KEY not in out and "ClueCon" not in out
    assert 'key = "**********"' in out and "[freeswitch]" in out
    import tomllib

    assert tomllib.loads(out)["api"]["port"] == 8000
    code, out, _ = await run(None, "config", "show", "--json")
    assert json.loads(out)["freeswitch"]["password"] == "**********"
    code, out, _ = await run(None, "config", "reference")
    assert code == 0 and "| `api.key` |" in out


async def test_invalid_settings_exit_2_naming_every_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIPBRIDGE_API__PORT", "http")
    monkeypatch.setenv("SIPBRIDGE_MEDIA__AUDIOSOCKET_PORT", "-5")
    code, out, err = await run(None, "config", "show")
    assert code == 2 and out == ""
    assert "api.port" in err and "media.audiosocket_port" in err and "Traceback" not in err
    code, _, err = await run(None, "serve")
    assert code == 2
    monkeypatch.delenv("SIPBRIDGE_API__PORT")
    monkeypatch.delenv("SIPBRIDGE_MEDIA__AUDIOSOCKET_PORT")
    monkeypatch.setenv("SIPBRIDGE_SIP__DOMAINS", "notjson")
    code, out, err = await run(None, "config", "show")
    assert code == 2 and out == "" and "Traceback" not in err
    assert "sip.domains: SIPBRIDGE_SIP__DOMAINS must be JSON" in err


# ---- serve as a real process ---------------------------------------------------------------------


async def start_serve(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, int]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SIPBRIDGE_")}
    environment["SIPBRIDGE_STORE__PATH"] = str(tmp_path / "serve.sqlite3")
    environment.update(env or {})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "serve",
        "--port",
        "0",
        *args,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    while True:
        line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        assert line, "serve exited before listening"
        match = re.search(r"API on http://127\.0\.0\.1:(\d+)", line)
        if match:
            return process, int(match.group(1))


async def stop_serve(process: asyncio.subprocess.Process, sig: int) -> tuple[int, str]:
    process.send_signal(sig)
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode or 0, stderr.decode()


async def test_serve_requires_a_key_outside_lab_mode(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SIPBRIDGE_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "serve", env=environment, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"api.key: required" in stderr and b"Traceback" not in stderr
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "serve",
        "--lab",
        "--host",
        "0.0.0.0",
        env=environment,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2 and b"api.lab_mode" in stderr


async def test_serve_with_a_key_then_sigterm(tmp_path: Path) -> None:
    process, port = await start_serve(tmp_path, env={"SIPBRIDGE_API__KEY": API_KEY})
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"http://127.0.0.1:{port}/assistant", headers={"Authorization": "Bearer nope"}
            ) as r:
                assert r.status == 401
            async with session.get(
                f"http://127.0.0.1:{port}/assistant", headers={"Authorization": f"Bearer {API_KEY}"}
            ) as r:
                assert r.status == 200 and await r.json() == []
    finally:
        code, stderr = await stop_serve(process, signal.SIGTERM)
    assert code == 0
    assert "draining" in stderr and "stopping" in stderr and "Traceback" not in stderr


async def test_serve_lab_mode_says_so_and_cli_works_against_it(tmp_path: Path) -> None:
    process, port = await start_serve(tmp_path, "--lab")
    try:
        url = f"http://127.0.0.1:{port}"
        code, out, err = await run(
            None, "--url", url, "assistant", "create", "--name", "Lab", "--first-message", "Hi"
        )
        assert code == 0, err
        assistant_id = out.split()[-1]
        code, out, err = await run(
            None,
            "--url",
            url,
            "number",
            "create",
            "--sip-uri",
            "sip:lab@127.0.0.1",
            "--assistant-id",
            assistant_id,
        )
        assert code == 0, err
    finally:
        code, stderr = await stop_serve(process, signal.SIGINT)
    assert code == 0
    assert "LAB MODE" in stderr


async def refused_serve(store_path: Path) -> tuple[int | None, str]:
    """Runs a lab serve on ``store_path`` that should refuse to start: (exit code, stderr).
    A serve that starts after all is killed, so a failing test leaves no process behind."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SIPBRIDGE_")}
    environment["SIPBRIDGE_STORE__PATH"] = str(store_path)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "serve", "--lab", "--port", "0",
        env=environment, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode, stderr.decode()


async def test_serve_refuses_a_damaged_store_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "serve.sqlite3"
    await filled_store(path)
    corrupt_calls_table(path)
    code, text = await refused_serve(path)
    assert code == 1, text
    assert (
        f"cannot start: the store {path} is damaged" in text and "restore it from a backup" in text
    )
    assert "Traceback" not in text


async def read_until(process: asyncio.subprocess.Process, text: str) -> str:
    """Reads the process's stderr up to the line holding ``text`` (that line)."""
    assert process.stderr is not None
    while True:
        line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        assert line, f"the process ended before saying {text!r}"
        if text in line:
            return line


async def health_status(port: int) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/health") as response,
    ):
        return response.status


async def test_serve_ignores_sighup_saying_so_then_stops_cleanly(tmp_path: Path) -> None:
    process, port = await start_serve(tmp_path, "--lab")
    try:
        process.send_signal(signal.SIGHUP)
        line = await read_until(process, "SIGHUP")
        assert "SIGHUP ignored: sipbridge has no reload; restart it to apply settings" in line
        assert await health_status(port) == 200
    finally:
        code, stderr = await stop_serve(process, signal.SIGTERM)
    assert code == 0 and "stopping" in stderr and "Traceback" not in stderr


async def test_a_second_serve_on_the_same_store_is_refused_and_kill_9_leaves_no_lock(
    tmp_path: Path,
) -> None:
    first, port = await start_serve(tmp_path, "--lab")
    try:
        code, text = await refused_serve(tmp_path / "serve.sqlite3")
        assert code == 1, text
        assert f"cannot start: another sipbridge (pid {first.pid}) is using the store" in text
        assert "Traceback" not in text
        assert await health_status(port) == 200  # the first goes on
    finally:
        first.kill()  # SIGKILL: no stopping step, no unlocking
        await asyncio.wait_for(first.communicate(), 30)
    third, port = await start_serve(tmp_path, "--lab")
    code, stderr = await stop_serve(third, signal.SIGTERM)
    assert code == 0, stderr


async def test_a_recording_downloads_to_a_file(
    service: Service, pipeline: PipelineServer, tmp_path: Path
) -> None:
    call_id = await recorded_call(
        service, pipeline, {"sipbridge": {"pipeline": {"url": pipeline.url}}}
    )
    target = tmp_path / "call.wav"
    code, out, _ = await run(service, "call", "recording", call_id, "-o", str(target))
    size = target.stat().st_size
    assert (code, out) == (
        0,
        f"saved the stereo recording of call {call_id} to {target} ({size} bytes)\n",
    )
    assert (
        target.read_bytes()
        == recording_path(service.recordings_path, call_id, "stereo").read_bytes()
    )
    mono = tmp_path / "mono.wav"
    code, _, _ = await run(
        service, "call", "recording", call_id, "--channel", "mono", "-o", str(mono)
    )
    assert code == 0
    assert (
        mono.read_bytes() == recording_path(service.recordings_path, call_id, "mono").read_bytes()
    )
    missing = tmp_path / "missing.wav"
    code, _, err = await run(service, "call", "recording", "nope", "-o", str(missing))
    assert (code, err) == (1, "sipbridge: HTTP 404: Call not found: nope\n")
    # Nothing half-written is left.
    assert not {"missing.wav", "missing.wav.part"} & set(os.listdir(tmp_path))
    code, _, err = await run(
        service, "call", "recording", call_id, "-o", str(tmp_path / "no/x.wav")
    )
    assert code == 2 and "cannot write" in err
