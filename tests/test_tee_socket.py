"""The socket backend's framing and its behaviour against TEEs that misbehave:
silent, dead, broken framing.  The well-behaved case is the reference TEE in
test_tee_handler.py and test_tee_e2e.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from hvcproxyd.handlers.tee_proxy import abi
from hvcproxyd.handlers.tee_proxy.backend import BackendError, BParam, Done, Msg, Pending, step_from_json
from hvcproxyd.handlers.tee_proxy.framing import MAX_FRAME, Decoder, FrameError, encode
from hvcproxyd.handlers.tee_proxy.socket_backend import SocketBackend


def test_framing_round_trip_and_split_reads() -> None:
    frames = [{"id": i, "x": "y" * i} for i in range(5)]
    blob = b"".join(encode(f) for f in frames)
    d = Decoder()
    got = []
    for i in range(0, len(blob), 3):
        got += d.feed(blob[i:i + 3])
    assert got == frames


@pytest.mark.parametrize("blob", [(MAX_FRAME + 1).to_bytes(4, "big"), b"\0\0\0\x02{x", b"\0\0\0\x02[]"])
def test_framing_refusals(blob: bytes) -> None:
    with pytest.raises(FrameError):
        Decoder().feed(blob)


@given(st.binary(max_size=200))
def test_decoder_never_crashes(blob: bytes) -> None:
    try:
        Decoder().feed(blob)
    except FrameError:
        pass


def test_messages_round_trip_and_refuse_junk() -> None:
    msg = Msg(1, 2, 3, params=[BParam(abi.ATTR_TYPE_VALUE_INPUT, 1, 2, 3),
                               BParam(abi.ATTR_TYPE_TMEM_INOUT, size=3, data=b"abc"),
                               BParam(abi.ATTR_TYPE_TMEM_OUTPUT, size=9, data=None)])
    assert Msg.from_json(msg.to_json()) == msg
    assert step_from_json({"done": msg.to_json()}, 1) == Done(msg)
    junk: object
    for junk in ({"cmd": -1}, {"cmd": 1, "params": "x"}, {"cmd": 1, "params": [{"attr": 9, "size": 1, "data": 5}]},
                 {"cmd": 1, "params": [{"attr": 9, "size": 1, "data": "!!"}]}, {"cmd": True}, []):
        with pytest.raises(BackendError):
            Msg.from_json(junk)
    with pytest.raises(BackendError):
        step_from_json({"what": 1}, 1)


async def fake_tee(path: Path, behave: Callable[[trio.SocketStream], Awaitable[None]],
                   *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(str(path))
    sock.listen(4)
    task_status.started()
    await trio.serve_listeners(behave, [trio.SocketListener(sock)])


async def hello_then(stream: trio.SocketStream, after: bytes | None) -> None:
    d = Decoder()
    while True:
        data = await stream.receive_some(4096)
        if not data:
            return
        for frame in d.feed(data):
            if frame["op"] == "hello":
                await stream.send_all(encode({"id": frame["id"], "threads": 2, "caps": 4}))
            elif after is None:
                continue  # silent
            else:
                await stream.send_all(after)
                await stream.aclose()
                return


@pytest.mark.parametrize("after,outcome", [(None, "pending"), (b"", "error"), (b"\xff\xff\xff\xff", "error")])
async def test_misbehaving_tee(tmp_path: Path, after: bytes | None, outcome: str) -> None:
    path = tmp_path / "t.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(fake_tee, path, lambda s: hello_then(s, after))
        backend = SocketBackend(str(path), connect_timeout=1)
        info = await backend.open()
        assert (info.threads, info.sec_caps) == (2, 4)
        with trio.fail_after(3):
            if outcome == "pending":
                step = await backend.call(1, Msg(abi.CMD_OPEN_SESSION), 0.05)
                assert isinstance(step, Pending)
                assert isinstance(await backend.wait(1, step.ticket, 0.05), Pending)
                with pytest.raises(BackendError):
                    await backend.vm_created(1, 0.05)  # lifecycle needs an answer
            else:
                with pytest.raises(BackendError):
                    await backend.call(1, Msg(abi.CMD_OPEN_SESSION), 1)
                assert backend.info is None  # dropped; the next operation reconnects
        await backend.close()
        nursery.cancel_scope.cancel()


async def test_no_tee_and_silent_hello(tmp_path: Path) -> None:
    with pytest.raises(BackendError):
        await SocketBackend(str(tmp_path / "none.sock"), connect_timeout=0.2).open()
    path = tmp_path / "mute.sock"

    async def mute(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(fake_tee, path, mute)
        with trio.fail_after(3), pytest.raises(BackendError):
            await SocketBackend(str(path), connect_timeout=0.1).open()
        nursery.cancel_scope.cancel()


def test_deeply_nested_frame_is_a_framing_error() -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(FrameError):
        Decoder().feed(len(body).to_bytes(4, "big") + body)
