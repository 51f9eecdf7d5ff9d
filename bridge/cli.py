"""The ops CLI: ``sipbridge serve`` runs the service; the other commands talk to it over the API.

Exit codes: 0 done, 1 failed (the service refused or could not be reached), 2 usage or settings
error. Errors are one line on stderr, never a traceback. Tables are for people; ``--json`` prints
the API's JSON for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from bridge import __version__
from bridge.client import ApiClient
from bridge.errors import ApiClientError, ConfigError, SipbridgeError
from bridge.protocol.dialects import DEFAULT_DIALECT, DIALECT_NAMES, ENCODINGS, SAMPLE_RATES
from bridge.recording import CHANNELS
from bridge.settings import Settings, api_base_url, load_settings, masked, reference_markdown

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_NONE_WORDS = ("none", "null")


class UsageError(Exception):
    """A command line that cannot work (exit code 2)."""


# ---- parser ------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps a value given before the sub-command from being reset by the sub-parser.
    parser.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML settings file")
    parser.add_argument(
        "--url", default=argparse.SUPPRESS, help="API base URL (default from settings)"
    )
    parser.add_argument(
        "--api-key", default=argparse.SUPPRESS, help="API key (default SIPBRIDGE_API__KEY)"
    )
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
    )


def _assistant_fields(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", help="JSON body (a file, or - for stdin); flags override it")
    parser.add_argument("--name")
    parser.add_argument("--first-message")
    parser.add_argument(
        "--first-message-mode",
        choices=[
            "assistant-speaks-first",
            "assistant-waits-for-user",
            "assistant-speaks-first-with-model-generated-message",
        ],
    )
    parser.add_argument("--system-prompt", help="sets model.messages to one system message")
    parser.add_argument("--end-call-message")
    parser.add_argument("--max-duration", type=int, help="maxDurationSeconds")
    parser.add_argument("--server-url", help="server.url ('none' clears it on update)")
    parser.add_argument("--server-secret", help="server.secret")
    parser.add_argument("--pipeline-url", help="sipbridge.pipeline.url (ws:// or wss://)")
    parser.add_argument("--pipeline-format", choices=DIALECT_NAMES)
    parser.add_argument("--pipeline-encoding", choices=ENCODINGS)
    parser.add_argument("--pipeline-sample-rate", type=int, choices=SAMPLE_RATES)


def _number_fields(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", help="JSON body (a file, or - for stdin); flags override it")
    parser.add_argument("--sip-uri", help="sip:user@host")
    parser.add_argument("--name")
    parser.add_argument("--assistant-id", help="assistant id ('none' clears it on update)")
    parser.add_argument("--server-url", help="server.url for assistant-request ('none' clears)")
    parser.add_argument("--server-secret", help="server.secret")
    fallback = parser.add_mutually_exclusive_group()
    fallback.add_argument("--fallback-sip-uri", help="fallbackDestination of type sip")
    fallback.add_argument("--fallback-number", help="fallbackDestination of type number")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = argparse.ArgumentParser(
        prog="sipbridge",
        description="Hands PBX calls to voice-AI assistants (Vapi-compatible).",
    )
    _common(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def sub(
        group: Any, name: str, help_text: str
    ) -> argparse.ArgumentParser:  # group is argparse's private subparsers type
        child: argparse.ArgumentParser = group.add_parser(name, help=help_text)
        _common(child)
        return child

    serve = sub(commands, "serve", "run the service")
    serve.add_argument(
        "--lab", action="store_true", help="lab mode: no API key needed (loopback only)"
    )
    serve.add_argument("--host", help="API address (api.host)")
    serve.add_argument("--port", type=int, help="API port (api.port)")

    for noun, label, fields in (
        ("assistant", "assistants", _assistant_fields),
        ("number", "SIP phone numbers", _number_fields),
    ):
        group = sub(commands, noun, f"manage {label}")
        actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
        fields(sub(actions, "create", f"create one of the {label}"))
        sub(actions, "list", f"list {label}")
        sub(actions, "show", "show one").add_argument("id")
        update = sub(actions, "update", "change fields (PATCH)")
        update.add_argument("id")
        fields(update)
        sub(actions, "delete", "delete one").add_argument("id")

    calls = sub(commands, "calls", "list calls")
    calls.add_argument("--active", action="store_true", help="only calls not yet ended")
    calls.add_argument("--limit", type=int, default=20)
    call = sub(commands, "call", "one call")
    call_actions = call.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub(call_actions, "show", "show a call record").add_argument("id")
    create = sub(call_actions, "create", "place an outbound call (POST /call)")
    create.add_argument("--assistant", required=True, help="assistant id")
    create.add_argument("--number", required=True, help="the SIP phone number's id (caller)")
    create.add_argument(
        "--to", required=True, help="the customer: a SIP URI (sip:bob@host) or a number"
    )
    create.add_argument("--name", help="the customer's name ({{customer.name}})")
    create.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a template variable (assistantOverrides.variableValues); repeatable",
    )
    create.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="X-NAME=VALUE",
        help="an X- header on the INVITE; repeatable",
    )
    sub(call_actions, "hangup", "hang up a live call").add_argument("id")
    sub(call_actions, "delete", "delete an ended call: its record and recordings").add_argument(
        "id"
    )
    recording = sub(call_actions, "recording", "download a call's recording (WAV)")
    recording.add_argument("id")
    recording.add_argument("-o", "--output", type=Path, required=True, help="file to write")
    recording.add_argument(
        "--channel",
        choices=CHANNELS,
        default="stereo",
        help="stereo: the caller left, the assistant right; mono: both mixed",
    )

    config = sub(commands, "config", "settings")
    config_actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub(config_actions, "show", "print the effective settings, secrets masked")
    sub(config_actions, "reference", "print the configuration reference (Markdown)")

    lab = sub(commands, "lab", "run a real call through Asterisk 22, SIPp and the demo pipeline")
    lab.add_argument("--stay", action="store_true", help="keep running for a softphone (Ctrl-C)")
    lab.add_argument("--state-dir", type=Path, default=Path(".lab"), help="logs and database")
    lab.add_argument(
        "--format",
        choices=DIALECT_NAMES,
        default=DEFAULT_DIALECT,
        help="the pipeline websocket's dialect (pipeline.default_format)",
    )
    lab_call = sub(
        commands,
        "lab-call",
        "call a running sipbridge through its PBX with SIPp and print what happened",
    )
    lab_call.add_argument("--sip", required=True, help="the PBX's SIP address, host:port")
    lab_call.add_argument("--state-dir", type=Path, help="SIPp's files (default: a new temp dir)")
    sub(commands, "health", "check the service's /health (exit 1 unless all is up)")
    demo = sub(commands, "demo-pipeline", "run the demo conversational pipeline (websocket)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8765)

    sub(commands, "version", "print the version")
    return parser


# ---- bodies from flags -------------------------------------------------------------------------


def _read_file(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        body = json.loads(text)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise UsageError(f"{path} must hold a JSON object")
    return body


def _clearable(value: str | None) -> str | None | bool:
    """A flag value, None for 'none'/'null' (clears the field), False when not given."""
    if value is None:
        return False
    return None if value.lower() in _NONE_WORDS else value


def assistant_body(args: argparse.Namespace) -> dict[str, Any]:
    """The assistant JSON from ``--file`` and the flags."""
    body = _read_file(args.file)
    for flag, key in (
        ("name", "name"),
        ("first_message", "firstMessage"),
        ("first_message_mode", "firstMessageMode"),
        ("end_call_message", "endCallMessage"),
        ("max_duration", "maxDurationSeconds"),
    ):
        if getattr(args, flag) is not None:
            body[key] = getattr(args, flag)
    if args.system_prompt is not None:
        model = dict(body.get("model") or {})
        model["messages"] = [{"role": "system", "content": args.system_prompt}]
        body["model"] = model
    _server_flags(body, args)
    pipeline = {
        key: getattr(args, flag)
        for flag, key in (
            ("pipeline_url", "url"),
            ("pipeline_format", "format"),
            ("pipeline_encoding", "encoding"),
            ("pipeline_sample_rate", "sampleRate"),
        )
        if getattr(args, flag) is not None
    }
    if pipeline:
        extension = dict(body.get("sipbridge") or {})
        extension["pipeline"] = {**(extension.get("pipeline") or {}), **pipeline}
        body["sipbridge"] = extension
    return body


def _server_flags(body: dict[str, Any], args: argparse.Namespace) -> None:
    url = _clearable(args.server_url)
    if url is None:
        body["server"] = None
    elif url is not False:
        body["server"] = {**(body.get("server") or {}), "url": url}
    if args.server_secret is not None:
        if not isinstance(body.get("server"), dict):
            raise UsageError("--server-secret needs --server-url")
        body["server"]["secret"] = args.server_secret


def number_body(args: argparse.Namespace) -> dict[str, Any]:
    """The phone-number JSON from ``--file`` and the flags."""
    body = _read_file(args.file)
    body.setdefault("provider", "vapi")
    if args.sip_uri is not None:
        body["sipUri"] = args.sip_uri
    if args.name is not None:
        body["name"] = args.name
    assistant_id = _clearable(args.assistant_id)
    if assistant_id is not False:
        body["assistantId"] = assistant_id
    _server_flags(body, args)
    if args.fallback_sip_uri:
        body["fallbackDestination"] = {"type": "sip", "sipUri": args.fallback_sip_uri}
    if args.fallback_number:
        body["fallbackDestination"] = {"type": "number", "number": args.fallback_number}
    return body


# ---- output ------------------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[str]], header: Sequence[str], out: TextIO) -> None:
    if not rows:
        out.write("(none)\n")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in (header, *rows):
        out.write("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() + "\n")


def _cut(text: Any, width: int = 40) -> str:
    value = "" if text is None else str(text)
    return value if len(value) <= width else value[: width - 1] + "…"


def _assistant_rows(items: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    rows = [
        [
            a["id"],
            _cut(a.get("name"), 24),
            _cut(a.get("firstMessage")),
            _cut(((a.get("sipbridge") or {}).get("pipeline") or {}).get("url") or "(default)", 32),
        ]
        for a in items
    ]
    return rows, ["ID", "NAME", "FIRST MESSAGE", "PIPELINE"]


def _number_rows(items: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    rows = [
        [
            n["id"],
            n.get("sipUri", ""),
            _cut(n.get("name"), 24),
            n.get("assistantId") or "-",
            _cut((n.get("server") or {}).get("url") or "-", 32),
        ]
        for n in items
    ]
    return rows, ["ID", "SIP URI", "NAME", "ASSISTANT", "SERVER"]


def _call_rows(items: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    rows = [
        [
            c["id"],
            c.get("status", ""),
            _cut((c.get("customer") or {}).get("number") or "-", 20),
            _cut(((c.get("phoneCallProviderDetails") or {}).get("sip") or {}).get("uri"), 32),
            c.get("assistantId") or "-",
            c.get("createdAt", ""),
            f"{(c.get('sipbridge') or {}).get('durationSeconds', 0):.1f}",
            c.get("endedReason") or "",
        ]
        for c in items
    ]
    return rows, ["ID", "STATUS", "FROM", "TO", "ASSISTANT", "CREATED", "SECONDS", "ENDED REASON"]


_ROWS: dict[str, Callable[[list[dict[str, Any]]], tuple[list[list[str]], list[str]]]] = {
    "assistant": _assistant_rows,
    "number": _number_rows,
    "calls": _call_rows,
}


def _print(data: Any, args: argparse.Namespace, out: TextIO, rows_of: str | None = None) -> None:
    if getattr(args, "json", False) or rows_of is None:
        out.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        return
    rows, header = _ROWS[rows_of](data)
    _table(rows, header, out)


# ---- commands ----------------------------------------------------------------------------------


def _client(settings: Settings, args: argparse.Namespace) -> ApiClient:
    url = getattr(args, "url", None) or api_base_url(settings)
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--url {url!r}: must start with http:// or https://")
    key = getattr(args, "api_key", None)
    if key is None and settings.api.key is not None:
        key = settings.api.key.get_secret_value()
    return ApiClient(url, key)


def _resource_command(args: argparse.Namespace, client: ApiClient, out: TextIO) -> int:
    path = "/assistant" if args.command == "assistant" else "/phone-number"
    body_of = assistant_body if args.command == "assistant" else number_body
    if args.action == "create":
        created = client.request("POST", path, body_of(args))
        _answer(created, f"created {args.command} {created['id']}\n", args, out)
        return EXIT_OK
    if args.action == "list":
        _print(client.request("GET", path), args, out, rows_of=args.command)
        return EXIT_OK
    if args.action == "show":
        _print(client.request("GET", f"{path}/{args.id}"), args, out)
        return EXIT_OK
    if args.action == "update":
        patch = body_of(args)
        if args.command == "number" and args.file is None and set(patch) == {"provider"}:
            raise UsageError("nothing to update: give at least one field flag or --file")
        if args.command == "assistant" and not patch:
            raise UsageError("nothing to update: give at least one field flag or --file")
        updated = client.request("PATCH", f"{path}/{args.id}", patch)
        _answer(updated, f"updated {args.command} {args.id}\n", args, out)
        return EXIT_OK
    deleted = client.request("DELETE", f"{path}/{args.id}")
    _answer(deleted, f"deleted {args.command} {args.id}\n", args, out)
    return EXIT_OK


def _run_client_command(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    client = _client(settings, args)
    if args.command == "health":
        health = client.request("GET", "/health")
        if getattr(args, "json", False):
            _print(health, args, out)
        else:
            links = ", ".join(f"{pbx} {state}" for pbx, state in health.get("pbx", {}).items())
            out.write(f"{health.get('status')}: store {health.get('store')}; {links or 'no PBX'}\n")
        return EXIT_OK if health.get("status") == "ok" else EXIT_FAILED
    if args.command == "lab-call":
        from bridge.lab.run import call_running_sipbridge  # noqa: PLC0415 - lab only

        state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="sipbridge-lab-call-"))
        code: int = asyncio.run(call_running_sipbridge(client, args.sip, state_dir, out))
        return code
    if args.command in ("assistant", "number"):
        return _resource_command(args, client, out)
    if args.command == "calls":
        query = {"limit": str(args.limit)}
        if args.active:
            query["status"] = "queued,ringing,in-progress,forwarding"
        _print(client.request("GET", "/call", query=query), args, out, rows_of="calls")
        return EXIT_OK
    if args.action == "show":
        _print(client.request("GET", f"/call/{args.id}"), args, out)
        return EXIT_OK
    if args.action == "recording":
        return _download_recording(client, args, out)
    if args.action == "create":
        call = client.request("POST", "/call", _outbound_call_body(args))
        _answer(
            call, f"placed call {call.get('id')} to {args.to} ({call.get('status')})\n", args, out
        )
        return EXIT_OK
    if args.action == "delete":
        deleted = client.request("DELETE", f"/call/{args.id}")
        _answer(deleted, f"deleted call {args.id} (its record and recordings)\n", args, out)
        return EXIT_OK
    call = client.request("POST", f"/call/{args.id}/hangup")
    _answer(call, f"hung up call {args.id} ({call.get('endedReason')})\n", args, out)
    return EXIT_OK


def _pairs(values: list[str], what: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        name, separator, text = value.partition("=")
        if not separator or not name:
            raise UsageError(f"{what} {value!r} is not NAME=VALUE")
        pairs[name] = text
    return pairs


def _outbound_call_body(args: argparse.Namespace) -> dict[str, Any]:
    """``POST /call``'s body from ``sipbridge call create``'s arguments."""
    to: str = args.to
    customer: dict[str, Any] = {"sipUri" if to.lower().startswith("sip") else "number": to}
    if args.name:
        customer["name"] = args.name
    body: dict[str, Any] = {
        "assistantId": args.assistant,
        "phoneNumberId": args.number,
        "customer": customer,
    }
    variables = _pairs(args.var, "--var")
    if variables:
        body["assistantOverrides"] = {"variableValues": variables}
    headers = _pairs(args.header, "--header")
    if headers:
        body["sipbridge"] = {"sipHeaders": headers}
    return body


def _answer(data: Any, sentence: str, args: argparse.Namespace, out: TextIO) -> None:
    """What the service answered, as JSON with ``--json``, else as one sentence."""
    if getattr(args, "json", False):
        _print(data, args, out)
    else:
        out.write(sentence)


def _download_recording(client: ApiClient, args: argparse.Namespace, out: TextIO) -> int:
    """Writes the recording beside its destination first: a failed download leaves no file
    that looks whole."""
    output: Path = args.output
    partial = output.with_name(output.name + ".part")
    try:
        with partial.open("wb") as file:
            size = client.download(f"/call/{args.id}/recording", {"channel": args.channel}, file)
        partial.replace(output)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    out.write(f"saved the {args.channel} recording of call {args.id} to {output} ({size} bytes)\n")
    return EXIT_OK


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    return json.dumps(str(value), ensure_ascii=False)


def settings_toml(data: Mapping[str, Any]) -> str:
    """Settings as a TOML document (usable as a config file); unset values are comments."""
    lines: list[str] = []
    for section, fields in data.items():
        lines.append(f"[{section}]")
        for key, value in fields.items():
            if value is None:
                lines.append(f"# {key} is not set")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _sighup_ignored() -> None:
    log.warning("SIGHUP ignored: sipbridge has no reload; restart it to apply settings")


def _serve(settings: Settings) -> int:
    from bridge.logs import configure  # noqa: PLC0415 - only serve needs logging and the service
    from bridge.service import Service  # noqa: PLC0415

    configure(settings.log.level, settings.log.format)

    async def run() -> int:
        loop = asyncio.get_running_loop()
        # SIGHUP's default action ends the process without its stopping step (no drain, no
        # records flushed); a terminal closing or a habit of `kill -HUP` to reload sends it.
        # There is nothing to reload (settings are read once), so it is ignored, with a word.
        loop.add_signal_handler(signal.SIGHUP, _sighup_ignored)
        # Before starting, so that a SIGTERM arriving while the service starts (or just after
        # it says it listens) is handled once it has started instead of killing it outright.
        stop, drain = asyncio.Event(), asyncio.Event()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, drain.set)
        service = Service(settings)
        try:
            await service.start()
        except (SipbridgeError, OSError) as exc:
            log.error("cannot start: %s", exc)
            return EXIT_FAILED
        stop_wait = asyncio.ensure_future(stop.wait())
        drain_wait = asyncio.ensure_future(drain.wait())
        try:
            await asyncio.wait({stop_wait, drain_wait}, return_when=asyncio.FIRST_COMPLETED)
            if drain.is_set() and not stop.is_set():
                log.info("SIGTERM: draining for up to %.0f s", settings.service.drain_timeout_s)
                drained = asyncio.ensure_future(service.drain(settings.service.drain_timeout_s))
                await asyncio.wait({drained, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                drained.cancel()
        finally:
            stop_wait.cancel()
            drain_wait.cancel()
            log.info("stopping")
            await service.aclose()
        return EXIT_OK

    return asyncio.run(run())


def _demo_pipeline(host: str, port: int) -> int:
    from bridge.demo import DemoPipeline  # noqa: PLC0415 - only this command needs it
    from bridge.logs import configure  # noqa: PLC0415

    configure("INFO", "text")

    async def run() -> int:
        demo = DemoPipeline(host, port)
        try:
            await demo.start()
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", host, port, exc)
            return EXIT_FAILED
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        await demo.aclose()
        return EXIT_OK

    return asyncio.run(run())


def main(
    argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Runs one CLI command; returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        # argparse prints help and usage errors itself; send them to this call's streams.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "version":
        out.write(f"sipbridge {__version__}\n")
        return EXIT_OK
    if args.command == "lab":
        from bridge.lab.run import run  # noqa: PLC0415 - the lab is not needed elsewhere

        code: int = asyncio.run(
            run(args.state_dir, stay=args.stay, out=out, pipeline_format=args.format)
        )
        return code
    if args.command == "demo-pipeline":
        return _demo_pipeline(args.host, args.port)
    overrides: dict[str, Any] = {}
    if args.command == "serve":
        api = {
            k: v
            for k, v in (("lab_mode", args.lab or None), ("host", args.host), ("port", args.port))
            if v is not None
        }
        overrides = {"api": api} if api else {}
    try:
        settings = load_settings(
            getattr(args, "config", None), overrides, for_service=args.command == "serve"
        )
    except ConfigError as exc:
        err.write(f"sipbridge: {exc}\n")
        return EXIT_USAGE
    try:
        if args.command == "serve":
            return _serve(settings)
        if args.command == "config" and args.action == "reference":
            out.write(reference_markdown())
            return EXIT_OK
        if args.command == "config":
            data = masked(settings)
            out.write(
                json.dumps(data, indent=2) + "\n"
                if getattr(args, "json", False)
                else settings_toml(data)
            )
            return EXIT_OK
        return _run_client_command(args, settings, out)
    except UsageError as exc:
        err.write(f"sipbridge: {exc}\n")
        return EXIT_USAGE
    except ApiClientError as exc:
        err.write(f"sipbridge: {exc}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
