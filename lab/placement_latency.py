"""How long a placement move takes: decision to adoption, between real worker processes.

`python -m lab.placement_latency [--moves N]` (no root): a 2-worker gateway in memory
(lab/enginetest) with one peer in session, moved back and forth N times by the Placer;
each move is timed from the table write to the slot record naming the new owner, not
handed (polled every 0.5 ms), and checked by a packet through the new owner with no new
handshake. (`shardwg show` reports the same latency at the supervisor loop's 0.1 s grain.)
"""

from __future__ import annotations

import argparse
import statistics
import time

from lab.bindtest import Wire
from lab.enginetest import MemoryGateway, config, new_key, peer, start_all
from lab.tuntest import ipv4_udp
from shardwg.engine import control
from shardwg.engine.placement import Move
from shardwg.engine.placer import Placer
from shardwg.proto.constants import MessageType
from shardwg.shm.placement import Mode, Reason


def measure(moves: int) -> list[float]:
    p_priv, p_pub = new_key()
    g_priv, g_pub = new_key()
    g = MemoryGateway(config(g_priv, [peer(p_pub, ["10.7.0.2/32"])]), workers=2)
    wire = Wire(g.addr)
    p = MemoryGateway(config(p_priv, [peer(g_pub, ["10.7.0.1/32"], wire.a_endpoint)]))
    try:
        placer = Placer(Mode.COUNT, 2, g.layout, g.region.buf,
                        lambda: g.broadcast(control.encode(control.Placement())))  # fmt: skip
        placer.start([p_pub], g.slot_of)
        start_all(g, p)
        p.tun[0].write(ipv4_udp("10.7.0.2", "10.7.0.1", 5000, 4000, b"hello"))
        if g.read_tun(5, wire.pump) is None:
            raise RuntimeError("no session")
        took = []
        for i in range(moves):
            src = placer.owner(p_pub)
            dst = 1 - src
            t0 = time.monotonic()
            placer.move(Move(p_pub, src, dst), Reason.LOAD)
            deadline = t0 + 5
            while time.monotonic() < deadline:
                rec = g.record(p_pub)
                if rec is not None and rec.owner == dst and not rec.handed:
                    break
                time.sleep(0.0005)
            else:
                raise RuntimeError(f"move {i} not adopted in 5 s")
            took.append(time.monotonic() - t0)
            placer.tick(time.monotonic())
            pkt = ipv4_udp("10.7.0.2", "10.7.0.1", 5000, 4000, b"after %d" % i)
            p.tun[0].write(pkt)
            if g.read_tun(5, wire.pump) != (dst, pkt):
                raise RuntimeError(f"move {i}: the packet did not come out of worker {dst}")
        if len(wire.sent("a>b", MessageType.INITIATION)) != 1:
            raise RuntimeError("a move needed a handshake")
        return took
    finally:
        wire.close()
        g.close()
        p.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moves", type=int, default=30)
    took = sorted(measure(ap.parse_args().moves))
    ms = [t * 1000 for t in took]
    print(f"{len(ms)} moves, no handshake: adoption median {statistics.median(ms):.1f} ms, "
          f"p90 {ms[int(len(ms) * 0.9) - 1]:.1f} ms, max {ms[-1]:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
