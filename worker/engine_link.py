"""The socket between a worker and its engine process: messages of a JSON header and float32 arrays.

No pickle crosses it: a header is JSON, an array is its raw bytes after a shape the header
names. The arrays are clips' samples and log-mel frames (a 30 s clip: ~3.4 MB), so a message
is received with one ``recv_into`` per array (``MSG_WAITALL``): one release of the
interpreter lock however large it is, not one per pipe-sized piece — the receiving side is
the engine process, whose decode loop should have its interpreter to itself.

Each end is used by one sending and one receiving thread at a time. A message is sent or
received whole by that thread; the worker's side does so off its main thread, where signal
handlers (the hard time limit, shutdown) raise and could cut a message in half.
"""

from __future__ import annotations

import json
import socket
import struct

import numpy as np

LENGTH = struct.Struct("!I")
MAX_HEADER = 64 << 20  # bytes: far above any header (one batch's outputs), far below a hang
BUFFER = 4 << 20  # socket buffer asked for (the system may give less): a 30 s clip in few round trips


class Link:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, BUFFER)
            except OSError:  # a system cap: the default buffer works, in more round trips
                pass

    @classmethod
    def pair(cls) -> tuple[Link, socket.socket]:
        """This end, and the other end's socket for a child process to inherit."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(mine), theirs

    def send(self, header: dict, arrays: list[np.ndarray] = ()) -> None:
        arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]
        data = json.dumps({**header, "arrays": [list(a.shape) for a in arrays]}).encode()
        self.sock.sendall(LENGTH.pack(len(data)) + data)
        for array in arrays:
            if array.size:
                self.sock.sendall(memoryview(array).cast("B"))

    def receive(self) -> tuple[dict, list[np.ndarray]]:
        """The next message; ``EOFError`` once the other end has closed."""
        (size,) = LENGTH.unpack(self._bytes(LENGTH.size))
        if size > MAX_HEADER:
            raise ValueError(f"engine link: a header of {size} bytes; the stream is out of step")
        header = json.loads(self._bytes(size))
        arrays = []
        for shape in header.pop("arrays"):
            array = np.empty(shape, dtype=np.float32)
            if array.size:  # a view of an empty array cannot be cast to bytes
                self._fill(memoryview(array).cast("B"))
            arrays.append(array)
        return header, arrays

    def _bytes(self, size: int) -> bytes:
        buffer = bytearray(size)
        self._fill(memoryview(buffer))
        return bytes(buffer)

    def _fill(self, view: memoryview) -> None:
        while view.nbytes:
            got = self.sock.recv_into(view, view.nbytes, socket.MSG_WAITALL)
            if got == 0:
                raise EOFError("the other end of the engine link closed")
            view = view[got:]

    def close(self) -> None:
        """End both directions now: the other end reads end-of-file, and so does a thread of this end blocked
        in ``receive`` (a plain close would wait for that thread's call to return)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # the other end is gone already
            pass
        self.sock.close()
