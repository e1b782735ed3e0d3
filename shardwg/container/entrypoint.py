"""Container entrypoint: find or build the config, check the container can run a gateway, then
exec `python -m shardwg run` in place (the image ENTRYPOINT, `python -m shardwg.container`).

The config is the mounted file `$SHARDWG_CONFIG` (default /etc/wireguard/wg0.conf) or, when
that file does not exist, one built from the WG_* variables (listed in environment.py) and
written owner-only into `$SHARDWG_RUNTIME_DIR` (default /run/shardwg, meant to be a tmpfs).
The run itself is shaped by SHARDWG_INTERFACE (default: the config file's stem, wg0 for an
environment config), SHARDWG_WORKERS ("auto": usable cores capped by the cgroup CPU quota),
SHARDWG_LOG_FORMAT (text|json) and SHARDWG_METRICS (passed on as --metrics when this shardwg
has it). A mistake exits with status 2 and a message that names the variable or file line at
fault and never contains a key.

Before exec'ing, it checks for CAP_NET_ADMIN (CapEff in /proc/self/status) and an openable
/dev/net/tun, the two things a container must be given (`--cap-add NET_ADMIN --device
/dev/net/tun`). exec, not a child process: the gateway's supervisor becomes the container's
PID 1, so the runtime's SIGTERM reaches it directly; it stops its workers, removes the
interface and UAPI socket and exits 0, and its main loop reaps every child that exits,
orphans re-parented to PID 1 included. The WG_* variables are dropped from the environment
the gateway inherits, so its /proc/<pid>/environ holds no key.

Other modes: `--check` does everything except writing and exec'ing; `--healthcheck` exits 0
when the gateway answers (its /healthz when SHARDWG_METRICS is set, else its UAPI socket);
a first argument that is not an option is exec'd as a command (`... shardwg genkey`); other
options are passed on to `shardwg run` (`--verbose`).

Concerns: environment.py (variables -> config text), plan.py (which config, where it is
written), privileges.py (capability and TUN checks), command.py (the gateway's command
line and environment), health.py (--healthcheck); this module puts them in order.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

from shardwg.container.command import child_environment, log_format, run_command
from shardwg.container.environment import EntrypointError
from shardwg.container.health import healthcheck
from shardwg.container.plan import plan, write_config
from shardwg.container.privileges import check_privileges

log = logging.getLogger("shardwg.container.entrypoint")

EXIT_USAGE = 2


def _setup_logging(env: Mapping[str, str]) -> None:
    from shardwg.cli import setup_logging

    try:
        fmt = log_format(env)
    except EntrypointError:
        fmt = "text"
    setup_logging(fmt, verbose=False)


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ if env is None else env)
    if args and not args[0].startswith("-"):
        try:  # a command instead of the gateway: `docker run IMAGE shardwg genkey`
            os.execvpe(args[0], args, child_environment(environ))
        except OSError as exc:
            print(f"shardwg entrypoint: cannot run {args[0]}: {exc.strerror}", file=sys.stderr)
            return 127
    if "--healthcheck" in args:
        return healthcheck(environ)
    check_only = "--check" in args
    extra = [a for a in args if a != "--check"]
    _setup_logging(environ)
    try:
        p = plan(environ)
        cmd = run_command(p, environ, extra)
        problems = check_privileges()
        if problems:
            raise EntrypointError("; ".join(problems))
        if p.text is not None and not check_only:
            p.warnings += write_config(p.config_path, p.text)
    except EntrypointError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    for warning in p.warnings:
        log.warning("%s", warning)
    source = "environment" if p.text is not None else "file"
    log.info("config %s (from the %s): interface %s, %d peer(s)",
             p.config_path, source, p.interface, len(p.config.peers))  # fmt: skip
    if check_only:
        print(" ".join(cmd))
        return 0
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.execvpe(cmd[0], cmd, child_environment(environ))
    return 1  # not reached


if __name__ == "__main__":  # the old spelling, `python -m shardwg.container.entrypoint`
    sys.exit(main())
