#!/usr/bin/env python3
"""A TCP proxy that adds round-trip time, for perf/world.sh's far-registry worlds.

    delay_proxy.py RTT_MS LISTEN_HOST:PORT=TARGET_HOST:PORT...

Why a proxy: this machine's kernel has no `sch_netem` (no qdiscs at all), so `tc ... netem
delay` inside a network namespace is not available. Every byte is delayed by RTT/2 in each
direction, in order, so a request/response exchange costs one RTT more than on loopback. The
TCP handshake is modelled too: the client's connect() to the proxy returns at once, so bytes it
sends in the first RTT after connecting are held until one RTT after the connect (the moment a
real client would have its SYN-ACK) and then delayed by RTT/2 like any others. TLS runs end to
end through the proxy, so its handshake round trips are delayed as well.

At most WINDOW bytes (4 MiB, like an autotuned TCP window; enough for 25 MiB/s per connection
at 100 ms RTT) are held per direction of a connection; beyond that the proxy stops reading
that side until the queue drains, so a fast sender is throttled to WINDOW per RTT/2 as TCP
would throttle it.
"""
import asyncio
import collections
import sys

WINDOW = 4 << 20
_EOF = object()
_CLOSE = object()


class Pipe:
    """One direction: bytes from `src` (a transport) are written to `dst` after `delay` s."""

    def __init__(self, loop, delay, not_before=0.0):
        self.loop, self.delay, self.not_before = loop, delay, not_before
        self.q = collections.deque()
        self.queued = 0
        self.src = self.dst = None
        self.timer = None
        self.dst_paused = False
        self.src_paused = False
        self.pending = []  # data before dst is connected

    def push(self, item):
        now = self.loop.time()
        when = max(now, self.not_before) + self.delay
        self.q.append((when, item))
        if item is not _EOF and item is not _CLOSE:
            self.queued += len(item)
        self._arm()
        self._flow()

    def _arm(self):
        if self.timer is None and self.q and self.dst is not None and not self.dst_paused:
            self.timer = self.loop.call_at(self.q[0][0], self._flush)

    def _flush(self):
        self.timer = None
        now = self.loop.time()
        while self.q and self.q[0][0] <= now and not self.dst_paused:
            _, item = self.q.popleft()
            if item is _CLOSE:
                self.dst.close()
                continue
            if item is _EOF:
                if self.dst.can_write_eof():
                    try:
                        self.dst.write_eof()
                    except OSError:
                        self.dst.close()
                else:
                    self.dst.close()
                continue
            self.queued -= len(item)
            self.dst.write(item)
        self._arm()
        self._flow()

    def _flow(self):
        want_pause = self.queued > WINDOW or self.dst_paused
        if self.src is None:
            return
        if want_pause and not self.src_paused:
            self.src_paused = True
            try:
                self.src.pause_reading()
            except (RuntimeError, AttributeError):
                pass
        elif not want_pause and self.src_paused and self.queued < WINDOW // 2:
            self.src_paused = False
            try:
                self.src.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    def set_dst(self, dst):
        self.dst = dst
        self._arm()

    def pause_dst(self):
        self.dst_paused = True
        if self.timer:
            self.timer.cancel()
            self.timer = None
        self._flow()

    def resume_dst(self):
        self.dst_paused = False
        self._arm()
        self._flow()


class Side(asyncio.Protocol):
    def __init__(self, inbound, outbound, on_lost):
        self.inbound, self.outbound, self.on_lost = inbound, outbound, on_lost
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.outbound.src = transport
        self.inbound.set_dst(transport)

    def data_received(self, data):
        self.outbound.push(data)

    def eof_received(self):
        self.outbound.push(_EOF)
        return True  # half-close: keep sending the other way

    def pause_writing(self):
        self.inbound.pause_dst()

    def resume_writing(self):
        self.inbound.resume_dst()

    def connection_lost(self, exc):
        self.on_lost(self)


async def serve(rtt_ms, listen, target):
    loop = asyncio.get_running_loop()
    half = rtt_ms / 2000.0
    thost, tport = target.rsplit(":", 1)

    def client_factory():
        t0 = loop.time()
        up = Pipe(loop, half, not_before=t0 + 2 * half)   # client -> server
        down = Pipe(loop, half)                            # server -> client
        sides = {}

        def lost(side):
            if side is sides.get("client"):
                sides["client_gone"] = True
                other, pipe = sides.get("server"), up
            else:
                other, pipe = sides.get("client"), down
            if other is not None and other.transport is not None:
                # Let what is queued towards the other side arrive first, then close it.
                pipe.push(_CLOSE)

        client = Side(down, up, lost)
        sides["client"] = client

        async def connect():
            try:
                _, server = await loop.create_connection(lambda: Side(up, down, lost), thost, int(tport))
            except OSError:
                if client.transport:
                    client.transport.close()
                return
            sides["server"] = server
            if sides.get("client_gone"):
                server.transport.close()

        orig_made = client.connection_made

        def made(transport):
            orig_made(transport)
            loop.create_task(connect())

        client.connection_made = made
        return client

    lhost, lport = listen.rsplit(":", 1)
    server = await loop.create_server(client_factory, lhost, int(lport), reuse_address=True)
    return server


async def amain(rtt_ms, specs):
    servers = []
    for spec in specs:
        listen, target = spec.split("=", 1)
        servers.append(await serve(rtt_ms, listen, target))
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        asyncio.run(amain(float(argv[0]), argv[1:]))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
