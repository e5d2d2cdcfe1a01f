"""`python -m bench.tracing_cost`: what tracing costs the processor per request.

Drives one worker's message handling in process (`extproc._HttpStream`, the code Envoy's
three messages of a passed-through answer run: request headers, request body, response
headers) N times, with tracing off and on, and reports CPU microseconds per request
(`time.process_time`, all threads, so the exporter's thread counts). With tracing on,
spans go over OTLP/gRPC to a receiver in another process, as in production.

Run it with PYTHONPATH pointing at another checkout (e.g. main) to compare tracing off
with the code before tracing existed.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import orjson
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.struct_pb2 import Struct

RECEIVER = """
import sys, time
sys.path.insert(0, {root!r})
from tests.otlp_receiver import GrpcReceiver
r = GrpcReceiver(port={port}).start()
print("ready", flush=True)
time.sleep(3600)
"""


def config_text(tracing_port: int | None) -> str:
    tracing = ""
    if tracing_port is not None:
        tracing = f"  tracing: {{enabled: true, endpoint: 'http://127.0.0.1:{tracing_port}'}}\n"
    return (
        "model_list:\n"
        "  - model_name: gpt-test\n"
        "    litellm_params: {model: openai/gpt-4o, api_base: 'http://127.0.0.1:9/v1',"
        " api_key: sk-x}\n"
        "    model_info: {id: dep1}\n"
        "llmux:\n" + (tracing or "  workers: 1\n")
    )


def messages(trace: bool) -> list[pb.ProcessingRequest]:
    headers = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":authority", "llmux"),
        ("content-type", "application/json"),
        ("x-envoy-attempt-count", "1"),
    ]
    if trace:
        headers.append(("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"))
    first = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=HeaderMap(
                headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in headers]
            )
        )
    )
    ns = Struct()
    ns.update({"authorization": "Bearer x", "path": "/v1/chat/completions"})
    first.metadata_context.filter_metadata["llmux.request"].CopyFrom(ns)
    attrs = Struct()
    attrs.update({"xds.upstream_host_metadata": 'key: "d" value { string_value: "0|dep1" }'})
    first.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    body = orjson.dumps(
        {
            "model": "gpt-test",
            "messages": [{"role": "user", "content": "hello there"}],
            "temperature": 0.2,
            "max_tokens": 100,
        }
    )
    second = pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))
    third = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=HeaderMap(headers=[HeaderValue(key=":status", raw_value=b"200")])
        )
    )
    return [first, second, third]


async def run(n: int, tracing_port: int | None, tmp: Path) -> float:
    from llmux_extproc.control.config import parse_config
    from llmux_extproc.dataplane import extproc
    from llmux_extproc.dataplane.gateway import Gateway

    config = parse_config(config_text(tracing_port))
    gateway = Gateway(config)
    tracer = None
    if tracing_port is not None:
        from llmux_extproc.observability.tracing import WorkerTracer

        tracer = WorkerTracer(config.settings.tracing)
        gateway.tracer = tracer
    msgs = messages(trace=tracing_port is not None)

    async def one() -> None:
        state = extproc._HttpStream(gateway)
        for m in msgs:
            await state.handle(m)
        state.abandon()

    for _ in range(500):  # warm up
        await one()
    started = time.process_time()
    for _ in range(n):
        await one()
    if tracer is not None:
        tracer.provider.force_flush()  # the export of these spans counts too
    used = time.process_time() - started
    if tracer is not None:
        tracer.shutdown()
    return used / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--off-only", action="store_true", help="for a checkout without tracing")
    parser.add_argument("--e2e", action="store_true", help="a real gateway, /proc CPU ticks")
    parser.add_argument("--protocol", default="grpc", help="--e2e: grpc or http/protobuf")
    args = parser.parse_args()
    if args.e2e:
        e2e(args.n, args.rounds, args.protocol)
        return
    root = str(Path(__file__).resolve().parent.parent)
    from tests.harness import free_port

    port = free_port()
    script = "import time; time.sleep(3600)" if args.off_only else RECEIVER
    receiver = subprocess.Popen(
        [sys.executable, "-c", script.format(root=root, port=port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready = args.off_only or (receiver.stdout and receiver.stdout.readline().strip())
        assert ready in (True, "ready")
        tmp = Path("/tmp")
        for _ in range(args.rounds):
            off = asyncio.run(run(args.n, None, tmp))
            line = f"tracing off: {off:6.1f} us CPU/request"
            if not args.off_only:
                on = asyncio.run(run(args.n, port, tmp))
                line += f"   tracing on: {on:6.1f} us CPU/request   (+{on - off:.1f})"
            print(line, flush=True)
    finally:
        receiver.terminate()
        receiver.wait()


def e2e(n: int, rounds: int, protocol: str = "grpc") -> None:
    """CPU per request of the whole gateway (Envoy, workers, supervisor: /proc ticks of
    `llmux run` and its children) for passed-through answers, tracing off and on."""
    import tempfile

    import httpx

    from bench.procstats import cmdline, cpu_seconds, descendants
    from tests.harness import MockUpstream, json_response, openai_chat_completion, running_gateway

    async def answer(request: object, body: bytes) -> object:
        return json_response(openai_chat_completion("gpt-4o", "hi"))

    root = str(Path(__file__).resolve().parent.parent)
    from tests.harness import free_port

    port = free_port()
    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER.format(root=root, port=port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    upstream = MockUpstream(answer).start()  # type: ignore[arg-type]
    from tests.otlp_receiver import Collector, http_receiver

    http = http_receiver(Collector()).start()
    endpoint = f"http://127.0.0.1:{port}"
    if protocol != "grpc":
        endpoint = f"{http.base_url}/v1/traces"
    try:
        assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
        for _ in range(rounds):
            for traced in (False, True):
                config: dict[str, object] = {
                    "model_list": [
                        {
                            "model_name": "gpt-test",
                            "litellm_params": {
                                "model": "openai/gpt-4o",
                                "api_base": f"{upstream.base_url}/v1",
                                "api_key": "sk-x",
                            },
                        }
                    ],
                    "llmux": {"access_log": "off"},
                }
                if traced:
                    config["llmux"] = {
                        "access_log": "off",
                        "tracing": {
                            "enabled": True,
                            "endpoint": endpoint,
                            "protocol": protocol,
                        },
                    }
                with (
                    tempfile.TemporaryDirectory() as tmp,
                    running_gateway(config, Path(tmp)) as gw,
                    httpx.Client(base_url=gw.openai_base) as client,
                ):
                    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
                    for _ in range(200):
                        client.post("/chat/completions", json=body)
                    time.sleep(6)  # warm-up spans exported
                    pids = [gw.process.pid, *descendants(gw.process.pid)]

                    def by_role(pids: list[int] = pids) -> dict[str, float]:
                        out: dict[str, float] = {}
                        for p in pids:
                            cmd = " ".join(cmdline(p))
                            role = (
                                "envoy"
                                if "envoy" in cmd.split()[0]
                                else ("worker" if " extproc " in cmd else "supervisor")
                            )
                            out[role] = out.get(role, 0.0) + cpu_seconds(p)
                        return out

                    before = by_role()
                    started = time.monotonic()
                    for _ in range(n):
                        assert client.post("/chat/completions", json=body).status_code == 200
                    time.sleep(6)  # Envoy's and the workers' batches of these go out
                    after = by_role()
                    wall = time.monotonic() - started
                    # The gateway's idle work (health checks, polling) over as long a time,
                    # measured right after, is not the requests'.
                    time.sleep(wall)
                    idle = by_role()
                    roles = {
                        r: (after[r] - before[r]) - (idle[r] - after[r]) for r in sorted(after)
                    }
                    used = sum(roles.values())
                label = "on " if traced else "off"
                parts = ", ".join(f"{r} {v / n * 1e6:.0f}" for r, v in roles.items())
                print(
                    f"e2e tracing {label}: {used / n * 1e6:7.1f} us CPU/request ({parts})",
                    flush=True,
                )
    finally:
        upstream.stop()
        http.stop()
        receiver.terminate()
        receiver.wait()


if __name__ == "__main__":
    main()
