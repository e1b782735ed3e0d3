"""The `shardwg` command: run a gateway, and the key helpers `wg` users know."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from shardwg import __version__
from shardwg.config import keys
from shardwg.config.model import ConfigError, load_config, private_key_file_warning

log = logging.getLogger("shardwg")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "ts": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": record.getMessage(),
                "pid": record.process,
            }
        )


def setup_logging(fmt: str, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def default_interface(config_path: str) -> str:
    """wg-quick's rule: the interface is named after the config file's stem."""
    return Path(config_path).stem


def default_workers() -> int:
    """Usable cores: CPU affinity, capped by a cgroup CPU quota (v2 or v1: containers); one
    where more than one worker is not sound (shm/ordering.py)."""
    from shardwg.observe.cpus import default_workers as usable
    from shardwg.shm import ordering

    if not ordering.multi_worker_ok():
        return 1
    return usable()


def cmd_run(args: argparse.Namespace) -> int:
    from shardwg.engine.supervisor import Supervisor, SupervisorError
    from shardwg.io.interface import GatewayError

    setup_logging(args.log_format, args.verbose)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    warning = private_key_file_warning(args.config)
    if warning:
        log.warning("%s", warning)
    ifname = args.interface or default_interface(args.config)
    if not 1 <= len(ifname) <= 15:
        log.error("interface name %r must be 1 to 15 characters", ifname)
        return 2
    workers = args.workers or default_workers()
    if not 1 <= workers <= 256:
        log.error("--workers must be between 1 and 256")
        return 2
    if args.tun_offload not in ("auto", "on", "off"):
        log.error("--tun-offload / SHARDWG_TUN_OFFLOAD must be auto, on or off")
        return 2
    metrics_addr = None
    if args.metrics:
        from shardwg.observe.metrics import parse_addr

        try:
            metrics_addr = parse_addr(args.metrics)
        except ValueError as exc:
            log.error("%s", exc)
            return 2
    sup = Supervisor(
        cfg,
        ifname,
        workers,
        config_path=args.config,
        metrics_addr=metrics_addr,
        tun_offload=args.tun_offload,
        run_hooks=not args.no_hooks,
        set_dns=not args.no_dns,
        placement=args.placement,
        spread=args.spread,
    )
    try:
        sup.start()
    except (GatewayError, SupervisorError) as exc:
        log.error("%s", exc)
        return 1
    try:
        return sup.run()
    except Exception as exc:
        log.error("gateway failed: %s", exc, exc_info=args.verbose)
        return 1
    finally:
        log.info("interface %s removed, exiting", ifname)


def cmd_show(args: argparse.Namespace) -> int:
    from shardwg.observe.show import running_interfaces, show
    from shardwg.observe.status import StatusError

    names = [args.interface] if args.interface else running_interfaces()
    if not names:
        print("no shardwg gateway is running", file=sys.stderr)
        return 1
    if args.watch:
        from shardwg.observe.watch import watch

        if args.json:
            print("shardwg show: --watch draws a table, --json one snapshot", file=sys.stderr)
            return 2
        if len(names) > 1:
            print(f"shardwg show --watch: name one of {', '.join(names)}", file=sys.stderr)
            return 2
        keys = sys.stdin.fileno() if sys.stdin.isatty() else -1
        try:
            return watch(names[0], args.count, sys.stdout, keys)
        except (StatusError, ValueError) as exc:
            print(f"shardwg show: {exc}", file=sys.stderr)
            return 1
    rc = 0
    for i, name in enumerate(names):
        try:
            out = show(name, args.json, args.interval)
        except (StatusError, ValueError) as exc:
            print(f"shardwg show: {exc}", file=sys.stderr)
            rc = 1
            continue
        if i and not args.json:
            print()
        print(out)
    return rc


def cmd_check(args: argparse.Namespace) -> int:
    from shardwg.observe.check import check

    text, status = check(args.json)
    print(text)
    return status


def cmd_genkey(_args: argparse.Namespace) -> int:
    print(keys.generate_private_key())
    return 0


def cmd_genpsk(_args: argparse.Namespace) -> int:
    print(keys.generate_preshared_key())
    return 0


def cmd_pubkey(_args: argparse.Namespace) -> int:
    data = sys.stdin.read()
    try:
        print(keys.public_key_from_private(data.strip()))
    except ValueError as exc:
        print(f"shardwg pubkey: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardwg", description=__doc__)
    p.add_argument("--version", action="version", version=f"shardwg {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a gateway in the foreground")
    run.add_argument("--config", "-c", required=True, help="wg-quick style config file")
    run.add_argument(
        "--workers",
        "-w",
        type=int,
        default=0,
        help="worker processes (default: usable cores)",
    )
    run.add_argument("--interface", "-i", help="interface name (default: config file stem)")
    run.add_argument("--log-format", choices=("text", "json"), default="text")
    run.add_argument(
        "--tun-offload",
        nargs="?",
        const="on",
        choices=("auto", "on", "off"),
        default=os.environ.get("SHARDWG_TUN_OFFLOAD", "auto"),
        help="TSO/USO + checksum offload on the TUN: read 64 KiB super-packets and cut them "
        "(auto: on with the native data path; env SHARDWG_TUN_OFFLOAD; see performance.md)",
    )
    run.add_argument(
        "--metrics", metavar="ADDR:PORT", help="serve /metrics and /healthz (e.g. 127.0.0.1:9586)"
    )
    run.add_argument(
        "--no-hooks",
        action="store_true",
        help="do not run the config's PreUp/PostUp/PreDown/PostDown (run as root through bash)",
    )
    run.add_argument(
        "--no-dns", action="store_true", help="ignore the config's DNS (no resolvconf)"
    )
    run.add_argument(
        "--placement",
        choices=("load", "count", "hash"),
        default="load",
        help="which worker owns each peer: balanced by count, then moved by measured load "
        "(load, the default); by count only; or by a hash of the key (hash, as before)",
    )
    run.add_argument(
        "--spread",
        choices=("off", "auto", "on"),
        default="auto",
        help="seal a peer's packets on every worker that reads them, not only its owner: "
        "auto (the default) when the peer keeps its worker busy (saturated; with fewer "
        "peers than workers, half a core) while a core sits idle, our sealing only; "
        "on: every peer, and its datagrams are opened by the worker their counter names "
        "(for a shardwg at the other end with --spread on or Spread = on); "
        "off: one worker per peer; never with --placement hash. A peer's own Spread = "
        "on|off|packets in the config file overrides it (packets: even one flow's packets "
        "go to every worker, reordered)",
    )
    run.add_argument("--verbose", "-v", action="store_true")
    run.set_defaults(func=cmd_run)

    show = sub.add_parser("show", help="status of running gateways, per peer and per worker")
    show.add_argument("interface", nargs="?", help="interface (default: every running one)")
    show.add_argument("--json", action="store_true", help="machine-readable (docs/show-json.md)")
    show.add_argument("--interval", type=float, default=0.5, help="seconds between rate samples")
    show.add_argument(
        "--watch",
        action="store_true",
        help="redraw the per-worker load once a second, like top (q or Ctrl-C quits)",
    )
    show.add_argument(
        "--count",
        type=int,
        default=0,
        metavar="N",
        help="--watch: stop after N frames (default: until q on a terminal, 10 otherwise)",
    )
    show.set_defaults(func=cmd_show)

    chk = sub.add_parser(
        "check", help="what this machine gives the data path, and what is missing (exit 1)"
    )
    chk.add_argument("--json", action="store_true", help="machine-readable probes and verdicts")
    chk.set_defaults(func=cmd_check)

    for name, fn, text in (
        ("genkey", cmd_genkey, "print a new private key"),
        ("pubkey", cmd_pubkey, "read a private key on stdin, print its public key"),
        ("genpsk", cmd_genpsk, "print a new preshared key"),
    ):
        sp = sub.add_parser(name, help=text)
        sp.set_defaults(func=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
