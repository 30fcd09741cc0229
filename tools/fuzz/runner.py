"""The engine: hypothesis draws calls in a thread, asyncio workers send them and judge the answers.

Hypothesis runs as a *generator* here, not as a test runner: each example is one call, handed
to the event loop and sent by one of a few workers over one channel. Nothing is raised back
into hypothesis (a run reports every finding instead of stopping at the first), so there is
no shrinking: the strategies keep findings small by leaning on edges rather than on noise.
Generation runs in chunks of examples, each with its own seed derived from ``--seed``.

Every call, typed or raw, goes out as bytes (``channel.unary_unary(path)`` without
serializers) so that the exact bytes of a failing call can be kept, and every OK answer is
decoded here, as a default client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed

from tools.fuzz import catalog
from tools.fuzz.catalog import Method, message_type
from tools.fuzz.invariants import Protected, Recorder, decode_problem, describe, status_problems
from tools.fuzz.strategies import Call, Strategies

log = logging.getLogger("fuzz")

CHUNK = 25
"""Examples per hypothesis run. Once told to stop, the generator still runs out its chunk
(each example then returns at once, but is drawn first): small chunks stop promptly."""
AMBIGUOUS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    }
)
"""Failures after which a write may or may not have been committed."""
SLOWEST = 5
CHANNEL_OPTIONS = [
    # Requests above the api's limit must reach it (to be refused there), so nothing is
    # capped on our side; answers keep gRPC's default 4 MiB receive limit, like any client.
    ("grpc.max_send_message_length", -1),
    ("grpc.enable_retries", 0),
]


@dataclass
class Result:
    """What one call got."""

    code: grpc.StatusCode
    message: str
    answers: list[Message] = field(default_factory=list)


@dataclass
class Stats:
    calls: Counter[str] = field(default_factory=Counter)
    codes: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    origins: Counter[str] = field(default_factory=Counter)
    origins_ok: Counter[str] = field(default_factory=Counter)
    skipped_protected: int = 0
    generator_errors: list[str] = field(default_factory=list)
    slowest: list[tuple[float, str]] = field(default_factory=list)
    """The slowest unary calls: (seconds, what)."""
    fuzzer_errors: list[str] = field(default_factory=list)
    """Failures of the fuzzer itself (not of the api): they fail the run too."""
    started: float = 0.0
    ended: float = 0.0


def writes(method: Method) -> bool:
    """Whether an OK answer of the method can acknowledge new events or enforcements."""
    return method.name.startswith(("Create", "Publish")) or method.name in (
        "ReemitEvent",
        "ReplayRule",
        "DeliverWebhook",
        "DeliverCloudEvents",
    )


@dataclass
class Ledger:
    """Every event and enforcement id an OK write answered, and writes that may hide a commit."""

    events: set[int] = field(default_factory=set)
    enforcements: set[int] = field(default_factory=set)
    ambiguous: list[str] = field(default_factory=list)

    def record_ids(self, events: Iterable[int], enforcements: Iterable[int]) -> None:
        self.events.update(events)
        self.enforcements.update(enforcements)

    def record(self, method: Method, answer: Message) -> None:
        if writes(method):
            self._walk(answer)

    def _walk(self, message: Message) -> None:
        name = message.DESCRIPTOR.full_name
        if name == "automation.v1.Event":
            self.events.add(getattr(message, "id"))  # noqa: B009 - any Event message
        elif name == "automation.v1.Enforcement":
            self.enforcements.add(getattr(message, "id"))  # noqa: B009
        for fd, value in message.ListFields():
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                for item in value if fd.is_repeated else [value]:
                    if item.DESCRIPTOR.full_name.startswith("automation."):
                        self._walk(item)
            elif fd.name == "event_id":
                self.events.add(value)
            elif fd.name == "enforcement_ids":
                self.enforcements.update(value)
            elif fd.name == "enforcement_id":  # a fire replay's match
                self.enforcements.add(value)


def _request_ids(message: Message) -> Iterable[str]:
    for fd, value in message.ListFields():
        if fd.type == FieldDescriptor.TYPE_MESSAGE and message_type(fd).full_name.startswith("automation."):
            for item in value if fd.is_repeated else [value]:
                yield from _request_ids(item)
        elif fd.name == "request_id" and value:
            yield value


class Engine:
    """Sends calls and judges the answers; ``run`` fuzzes, ``send`` replays one call."""

    def __init__(
        self,
        target: str,
        *,
        strategies: Strategies | None = None,
        recorder: Recorder,
        protected: Protected | None = None,
        ledger: Ledger | None = None,
        seed: int = 0,
        workers: int = 4,
        deadline_s: float = 30.0,
        watch_read_s: float = 1.5,
        methods: Iterable[Method] | None = None,
        tokens: Sequence[str] = (),
    ) -> None:
        self.target = target
        # Many principals: each call goes under one of these tokens (of every role), drawn
        # by a seeded generator; none: the api runs without authentication.
        self.tokens = tuple(tokens)
        self._draw = random.Random(seed)
        self.strategies = strategies or Strategies()
        self.recorder = recorder
        self.protected = protected or Protected()
        self.ledger = ledger or Ledger()
        self.seed = seed
        self.workers = workers
        self.deadline_s = deadline_s
        self.watch_read_s = watch_read_s
        self.methods = tuple(methods or catalog.methods())
        self.stats = Stats()
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)

    async def close(self) -> None:
        await self.channel.close()

    # -- one call
    async def send(self, call: Call) -> Result:
        """Sends ``call``, judges the answer (violations go to the recorder) and returns it."""
        method = call.method
        began = time.monotonic()
        try:
            if method.server_streaming:
                result = await self._stream(call)
            else:
                result = await self._unary(call)
        except Exception as exc:  # noqa: BLE001 - a fuzzer bug must not end the run unreported
            self.stats.fuzzer_errors.append(f"{method.short}: {type(exc).__name__}: {exc}"[:300])
            return Result(grpc.StatusCode.UNKNOWN, f"fuzzer error: {exc}")
        elapsed = time.monotonic() - began
        # The ledger first: what an OK write answered is recorded before any bookkeeping that
        # could fail (which would otherwise leave a stored event that "no call returned").
        if result.code == grpc.StatusCode.OK:
            for answer in result.answers:
                self.ledger.record(method, answer)
        try:
            if not method.server_streaming:  # streams are held open on purpose
                self._timed(elapsed, call, result)
            self._judge(call, result)
        except Exception as exc:  # noqa: BLE001 - reported: a dead worker must not go unnoticed
            self.stats.fuzzer_errors.append(f"judging {method.short}: {type(exc).__name__}: {exc}"[:300])
        return result

    def _timed(self, seconds: float, call: Call, result: Result) -> None:
        """Keeps the slowest calls: a request that stalls the api shows up here (and in the
        ordinary traffic's latency) long before it reaches a deadline."""
        slowest = self.stats.slowest
        if len(slowest) < SLOWEST or seconds > slowest[-1][0]:
            text = f"{call.method.short} [{call.origin}] {result.code.name}, {len(call.payload):,} B: "
            slowest.append((seconds, text + describe(self._message(call), 160)))
            slowest.sort(key=lambda x: -x[0])
            del slowest[SLOWEST:]

    async def _unary(self, call: Call) -> Result:
        method = call.method
        try:
            data: bytes
            if method.client_streaming:
                many: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = self.channel.stream_unary(method.path)
                data = await many(iter([call.payload]), timeout=self.deadline_s, metadata=self._metadata())
            else:
                one: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(method.path)
                data = await one(call.payload, timeout=self.deadline_s, metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            return Result(exc.code(), exc.details() or "")
        return self._decoded(call, [data], grpc.StatusCode.OK, "")

    async def _stream(self, call: Call) -> Result:
        """Opens the stream, reads at most two messages briefly, then cancels: the fuzzer must
        not sit on leases that the real executor should get."""
        method = call.method
        stream: grpc.aio.StreamStreamCall[bytes, bytes] | grpc.aio.UnaryStreamCall[bytes, bytes]
        if method.client_streaming:
            both: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = self.channel.stream_stream(method.path)
            stream = both(iter([call.payload]), timeout=self.deadline_s, metadata=self._metadata())
        else:
            out: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = self.channel.unary_stream(method.path)
            stream = out(call.payload, timeout=self.deadline_s, metadata=self._metadata())
        raw: list[bytes] = []
        ended = False
        try:
            for _ in range(2):
                try:
                    item = await asyncio.wait_for(stream.read(), self.watch_read_s)
                except TimeoutError:
                    break
                if item is grpc.aio.EOF:
                    ended = True
                    break
                assert isinstance(item, bytes)
                raw.append(item)
        except grpc.aio.AioRpcError as exc:
            return Result(exc.code(), exc.details() or "")
        finally:
            stream.cancel()
        if ended:
            code = await stream.code()
            if code != grpc.StatusCode.OK:
                return Result(code, await stream.details() or "")
        return self._decoded(call, raw, grpc.StatusCode.OK, "")

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        if not self.tokens:
            return None
        return (("authorization", f"Bearer {self._draw.choice(self.tokens)}"),)

    def _decoded(self, call: Call, raw: list[bytes], code: grpc.StatusCode, message: str) -> Result:
        result = Result(code, message)
        for data in raw:
            answer, problem = decode_problem(call.method.response, data)
            if problem is not None:
                self._violation(call, code, message, problem)
            elif answer is not None:
                result.answers.append(answer)
        return result

    def _judge(self, call: Call, result: Result) -> None:
        method = call.method
        self.stats.calls[method.short] += 1
        self.stats.codes[method.short][result.code.name] += 1
        origin = call.origin.partition(":")[0]
        self.stats.origins[origin] += 1
        if result.code == grpc.StatusCode.OK:
            self.stats.origins_ok[origin] += 1
        for problem in status_problems(result.code, result.message, len(call.payload), bool(self.tokens)):
            self._violation(call, result.code, result.message, problem)
        if result.code == grpc.StatusCode.OK:
            for answer in result.answers:
                self.strategies.pool.observe(answer)
            if call.message is not None:
                for key in _request_ids(call.message):
                    self.strategies.pool.add_request_id(key)
        elif result.code in AMBIGUOUS and writes(method):
            self.ledger.ambiguous.append(f"{method.short} {result.code.name}: {describe(self._message(call), 160)}")

    def _message(self, call: Call) -> Message:
        if call.message is not None:
            return call.message
        try:
            return call.method.request.FromString(call.payload)
        except DecodeError:
            return call.method.request()

    def _violation(self, call: Call, code: grpc.StatusCode, message: str, problem: str) -> None:
        if call.message is not None:
            description = describe(call.message)
        else:
            try:
                decoded = call.method.request.FromString(call.payload)
                description = f"{call.origin} bytes decoding to {{{describe(decoded, 300)}}}"
            except DecodeError:
                description = f"{call.origin} bytes the api cannot decode (starting {call.payload[:12]!r})"
        v = self.recorder.record(call.method, call.origin, code, message, problem, call.payload, description)
        if v.count == 1:
            log.warning("violation: %s", v.line())

    # -- fuzzing
    async def run(self, seconds: float) -> None:
        """Fuzzes for ``seconds``: one generator thread, ``workers`` senders."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Call | None] = asyncio.Queue()
        slots = threading.Semaphore(self.workers * 2)
        stop = threading.Event()
        self.stats.started = time.monotonic()

        def hand_over(call: Call) -> None:
            while not stop.is_set():
                if slots.acquire(timeout=0.2):
                    loop.call_soon_threadsafe(queue.put_nowait, call)
                    return

        thread = threading.Thread(target=self._generate, args=(hand_over, stop), name="fuzz-generator", daemon=True)

        async def worker() -> None:
            while (call := await queue.get()) is not None:
                slots.release()
                await self.send(call)

        workers = [asyncio.create_task(worker(), name=f"fuzz-worker-{i}") for i in range(self.workers)]
        thread.start()
        try:
            await asyncio.sleep(seconds)
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 30)
            # Calls already drawn are still sent: each may be the one that finds something.
            for _ in workers:
                queue.put_nowait(None)
            for outcome in await asyncio.gather(*workers, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    self.stats.fuzzer_errors.append(f"a worker ended: {type(outcome).__name__}: {outcome}"[:300])
            self.stats.ended = time.monotonic()

    def _generate(self, hand_over: object, stop: threading.Event) -> None:
        assert callable(hand_over)
        strategy = self.strategies.calls(self.methods)
        chunk = 0
        while not stop.is_set():

            @settings(
                max_examples=CHUNK,
                database=None,
                deadline=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
                verbosity=Verbosity.quiet,
            )
            @hypothesis_seed(self.seed * 1_000_003 + chunk)
            @given(strategy)
            def draw(call: Call) -> None:
                if stop.is_set():
                    return
                if (call.message is not None and self.protected.touches(call.method, call.message)) or (
                    call.message is None and self.protected.touches_raw(call.method, call.payload)
                ):
                    self.stats.skipped_protected += 1
                    return
                hand_over(call)

            try:
                draw()
            except Exception as exc:  # noqa: BLE001 - reported, and generation goes on
                if len(self.stats.generator_errors) < 20:
                    self.stats.generator_errors.append(f"{type(exc).__name__}: {exc}"[:300])
                log.warning("generator chunk %d failed: %s", chunk, exc)
            chunk += 1

    # -- the run's summary needs these
    def codes_of(self, method: str) -> Counter[str]:
        return self.stats.codes[method]


async def typed(engine: Engine, name: str, message: Message, origin: str = "known") -> Result:
    """Sends a typed request to the method called ``name`` through the engine (judged)."""
    method = catalog.find(name)
    return await engine.send(Call(method, message.SerializeToString(), origin, message))


async def wait_until(predicate: object, timeout: float, interval: float = 0.2) -> bool:
    """Polls an async predicate until it holds or ``timeout`` passes."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if await predicate():
                return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
