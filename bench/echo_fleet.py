"""The benchmarks' device fleet in C (bench/mqtt_echo_fleet.c), built on first use; nanoiot-sim when it cannot be.

``nanoiot-sim`` costs 55-80 µs of CPU per two-way RPC, on the cores the server being measured runs on; the C fleet
sends the server the same packets (see the C file's header) for ~20 µs. It is compiled with ``cc -O2`` into a
directory outside the work tree, keyed by the source's hash (so an edited source is rebuilt, and two benchmarks
starting at once do not race: each build goes to a temporary name, then is renamed). Without a C compiler, or for
what only the Python fleet does (``--answer delay|fail|disconnect``, ``--call-method``, ...), the fleet is
``nanoiot-sim``, with a warning on stderr.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT
from bench.common import start_fleet as start_sim_fleet

SOURCE = Path(__file__).resolve().with_name("mqtt_echo_fleet.c")
#: What the C fleet answers, and the nanoiot-sim options it takes (with a value, or none for flags).
ANSWERS = ("echo", "ok", "none")
OPTIONS = {"--host": 1, "--count": 1, "--skip": 1, "--protocol": 1, "--report-interval": 1, "--json": 0}


def compiler() -> str | None:
    """``$CC``, else cc, gcc or clang on the PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build_dir() -> Path:
    return Path(os.environ.get("NANOIOT_BENCH_BUILD") or Path(tempfile.gettempdir()) / "nanoiot-bench-build")


def binary(cc: str | None) -> Path | None:
    """The fleet compiled by ``cc`` (built now if this source was never built), or None without a compiler."""
    if cc is None:
        return None
    source = SOURCE.read_bytes()
    target = build_dir() / f"mqtt_echo_fleet-{hashlib.sha256(source).hexdigest()[:12]}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    out = subprocess.run([cc, "-O2", "-o", str(partial), str(SOURCE)], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{cc} could not build {SOURCE.name}: {out.stderr[-2000:]}")
    os.replace(partial, target)
    return target


def supported(answer: str, extra: list[str] | None) -> bool:
    """Whether the C fleet does what these nanoiot-sim options ask."""
    if answer not in ANSWERS:
        return False
    items = list(extra or [])
    while items:
        option = items.pop(0)
        if option not in OPTIONS:
            return False
        del items[:OPTIONS[option]]
    return True


def fleet_command(mqtt_port: int, tokens_file: Path, answer: str = "echo", extra: list[str] | None = None,
                  cc: str | None = "auto", fleet: str = "c") -> tuple[list[str], str]:
    """(argv, "c" or "sim"): the C fleet when it can be built and does what is asked, else nanoiot-sim's (with a
    warning on stderr). ``cc``: "auto" to look for a compiler, None to act as if there were none; ``fleet="sim"``:
    nanoiot-sim whatever the compiler (the reference the C fleet is compared with)."""
    common = ["--port", str(mqtt_port), "--tokens-file", str(tokens_file), "--answer", answer, "--hold", "100000",
              "--concurrency", "200", "--json", *(extra or [])]
    if fleet == "sim":
        pass
    elif not supported(answer, extra):
        print(f"warning: the C fleet cannot do --answer {answer} {' '.join(extra or [])}: using nanoiot-sim",
              file=sys.stderr)
    else:
        built = binary(compiler() if cc == "auto" else cc)
        if built is not None:
            return [str(built), *common], "c"
        print("warning: no C compiler (cc, gcc, clang or $CC): the device fleet is nanoiot-sim (Python), which "
              "takes ~60 µs of CPU per RPC on the cores the server is measured on", file=sys.stderr)
    return [sys.executable, "-m", "nanoiot.sim.fleet", *common], "sim"


def start_fleet(mqtt_port: int, tokens_file: Path, out: Path, answer: str = "echo", cwd: Path | None = None,
                env: dict[str, str] | None = None, extra: list[str] | None = None,
                cc: str | None = "auto", fleet: str = "c") -> tuple[subprocess.Popen, float]:
    """bench.common.start_fleet's signature and return value, with the C fleet when possible (its ``connected``
    line says ``"fleet": "c"``; fleet_command tells beforehand)."""
    command, _ = fleet_command(mqtt_port, tokens_file, answer, extra, cc, fleet)
    return start_sim_fleet(mqtt_port, tokens_file, out, answer, cwd or ROOT, env, extra, command=command)
