"""The local demo cluster: a scheduler stub, a seed peer, three peer daemons and an HTTP origin, all on loopback.

0. The daemons know only the manager's address (the stub answers ``ListSchedulers`` naming itself) and
   discover the scheduler from it.
1. A 200 MB "model" is downloaded by peer A, then by peers B and C: the scheduler asks the seed peer to
   fetch it from the origin and A takes its pieces from the seed while the seed is still downloading;
   B and C take theirs from the peers. The origin serves it once, to the seed.
2. Peer C has a 300 MB cache. The layers of a "busybox" image are held by ``container:busybox``
   (a running container); pulling other images pushes the cache over its high watermark and GC
   evicts them least-recently-used first, while the busybox layers stay and verify.
3. Where containerd and the distribution registry are installed (the test set-up installs them as
   root), peer D is a registry mirror for a real containerd: a real busybox image is pulled through
   it, a container runs, and the daemon learns from containerd itself that the container holds the
   image's blobs (each a task named by its URL at the registry, as upstream names it). Elsewhere this
   step says why it is skipped.

Everything lives under ``.demo/`` (and a short temporary directory for the unix sockets). With
``--once`` the demo exits after the walk-through; otherwise the cluster stays up for inspection with
dfctl, dfget and grpcurl until Ctrl-C. It reuses the test suite's process helpers (tests/support.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dfdaemon.ids import task_id  # noqa: E402
from tests.containerd_support import containerd_skip_reason, running_containerd  # noqa: E402
from tests.registry_support import (  # noqa: E402
    busybox_image,
    busybox_skip_reason,
    push_image,
    registry_skip_reason,
    running_registry,
)
from tests.support import (  # noqa: E402
    DaemonProcess,
    SchedulerProcess,
    dfget,
    running_daemon,
    running_origin,
    running_scheduler,
    wait_for_hosts,
    wait_for_line,
)

MB = 1_000_000
MODEL_MB = 200
BIN = Path(sys.executable).parent


def say(text: str = "") -> None:
    print(text, flush=True)


def dfctl(daemon: DaemonProcess, *args: str, as_json: bool = True) -> Any:
    out = subprocess.run(
        [str(BIN / "dfctl"), "-e", str(daemon.socket_path), *(["--json"] if as_json else []), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout) if as_json else out.stdout


def fetch(daemon: DaemonProcess, url: str, output: Path) -> dict[str, Any]:
    out = dfget(daemon, url, output, "--json")
    if out.returncode != 0:
        raise SystemExit(f"demo: dfget failed: {out.stderr.strip()}")
    return dict(json.loads(out.stdout))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start_peers(stack: ExitStack, state: Path, sockets: Path, scheduler: SchedulerProcess) -> list[DaemonProcess]:
    """The seed and peers A, B, C; each finds the scheduler through the manager's ``ListSchedulers``."""
    manager = {"addr": f"http://{scheduler.address}"}
    peers: list[DaemonProcess] = []
    for name, extra in (
        # The seed fetches from the origin for the others; it is on loopback, which the network may not reach
        # unless allowed.
        ("seed", {"seedPeer": {"enable": True}, "download": {"backToSource": {"allowedNetworks": ["127.0.0.0/8"]}}}),
        ("a", {}),
        ("b", {}),
        ("c", {"gc": {"policy": {"diskThreshold": "300MB", "gracePeriod": "1s"}}}),
    ):
        config: dict[str, Any] = {
            "host": {"hostname": f"peer-{name}"},
            "manager": manager,
            "scheduler": {"announceInterval": "5s"},
            **extra,
        }
        config["download"] = {**config.get("download", {}), "server": {"socketPath": str(sockets / f"{name}.sock")}}
        peer = stack.enter_context(running_daemon(state / f"peer-{name}", config))
        found = wait_for_line(peer.log_path, r"scheduling through (\S+)", peer.proc).group(1)
        say(f"   peer {name} asked the manager and is scheduling through {found}")
        peers.append(peer)
    wait_for_hosts(scheduler, len(peers))
    return peers


def containerd_step(stack: ExitStack, state: Path, sockets: Path, scheduler: str) -> bool | None:
    """Step 3; None when it cannot run here, else whether the container's holds appeared."""
    reason = registry_skip_reason() or busybox_skip_reason() or containerd_skip_reason()
    if reason is not None:
        say(f"3. containerd: skipped ({reason})")
        return None
    say("3. A real containerd pulls through peer D's registry mirror; the daemon asks containerd what is in use")
    registry = stack.enter_context(running_registry(state / "registry"))
    image = busybox_image()
    push_image(registry.url, "library/busybox", "demo", image)
    containerd = stack.enter_context(running_containerd(state / "containerd"))
    config: dict[str, Any] = {
        "host": {"hostname": "peer-d"},
        "scheduler": {"addrs": [scheduler], "announceInterval": "5s"},
        "download": {"server": {"socketPath": str(sockets / "d.sock")}},
        "proxy": {"enable": True, "registryMirror": {"insecureRegistries": [registry.host]}},
        "runtime": {"containerd": {"address": containerd.address}},
    }
    peer = stack.enter_context(running_daemon(state / "peer-d", config))
    containerd.set_mirror(registry.host, f"http://127.0.0.1:{peer.proxy_port}")
    ref = f"{registry.host}/library/busybox:demo"
    containerd.pull(ref)
    say(f"   containerd pulled {ref} through the mirror on 127.0.0.1:{peer.proxy_port}")
    running = containerd.run(ref, "demo-busybox")
    say(f"   container demo-busybox {'runs' if running else 'created (no task can run here)'}")
    holder = "container:default/demo-busybox"
    # Each blob is the task its URL at the registry names (enableTaskIDBasedBlobDigest is false, as upstream).
    wanted = {task_id(f"http://{registry.host}/v2/library/busybox/blobs/{blob.digest}") for blob in image.blobs}
    deadline = time.monotonic() + 20
    held: set[str] = set()
    while time.monotonic() < deadline and held != wanted:
        held = {hold["task_id"] for hold in dfctl(peer, "use", "ls", "--holder", holder)["holds"]}
        time.sleep(0.2)
    say(f"   {holder} holds the image's config and layer ({len(held)} of {len(wanted)} blobs):")
    say(dfctl(peer, "use", "ls", as_json=False).rstrip())
    say()
    return held == wanted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="walk through the demo, then stop the cluster")
    args = parser.parse_args()

    state = ROOT / ".demo"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir()
    sockets = Path(tempfile.mkdtemp(prefix="dfdemo-"))  # unix socket paths must stay short
    files = state / "origin"
    files.mkdir()
    with (files / "model.bin").open("wb") as model:
        for _ in range(MODEL_MB // 10):
            model.write(os.urandom(10 * MB))
    busybox = {f"busybox-layer-{i}": 2 * MB for i in range(3)}
    others = {f"app-{i}-layer": 10 * MB for i in range(8)}  # with the model, past the 240 MB high watermark
    for name, size in {**busybox, **others}.items():
        (files / name).write_bytes(os.urandom(size))
    out = state / "downloads"
    out.mkdir()

    with ExitStack() as stack:
        stack.callback(lambda: shutil.rmtree(sockets, ignore_errors=True))
        origin = stack.enter_context(running_origin(files))
        scheduler_process = stack.enter_context(running_scheduler(state / "scheduler", args=["--manager"]))
        scheduler = scheduler_process.address
        say(f"0. Discovery: the scheduler stub also answers as the manager on {scheduler}")
        seed, *peers = start_peers(stack, state, sockets, scheduler_process)
        say(f"cluster up: origin {origin.address}, scheduler {scheduler}, seed and peers A/B/C (logs in .demo/)")
        say()

        say(f"1. Peer to peer: a {MODEL_MB} MB model, downloaded by A (the scheduler asks the seed), then by B and C")
        for peer, label in zip(peers, "ABC", strict=True):
            report = fetch(peer, origin.url("model.bin"), out / f"model-{label}.bin")
            pieces = report["pieces"]
            say(
                f"   peer {label}: {pieces['BACK_TO_SOURCE']} pieces from the origin, "
                f"{pieces['REMOTE_PEER']} from peers, {pieces['LOCAL_PEER']} local, {report['elapsed_seconds']:.2f}s"
            )
        digests = {label: sha256(out / f"model-{label}.bin") for label in "ABC"}
        for label, digest in digests.items():
            say(f"   sha256 of peer {label}'s copy: {digest}")
        identical = len(set(digests.values())) == 1 and digests["A"] == sha256(files / "model.bin")
        served = origin.bytes_served("model.bin")
        ratio = served / (MODEL_MB * MB)
        seeded = sum(task["state"] == "finished" for task in dfctl(seed, "task", "ls")["tasks"])
        say(f"   the seed peer fetched the model from the origin for them ({seeded} finished task cached on the seed)")
        say(f"   origin served {served} bytes for the model")
        say(f"   all three copies identical: {identical}; origin bytes / file size = {ratio:.3f}")
        say()

        say("2. GC never evicts data in use: peer C has a 300 MB cache (high watermark 240 MB, low 180 MB)")
        peer = peers[2]
        ids = [fetch(peer, origin.url(name), out / name)["task_id"] for name in busybox]
        dfctl(peer, "use", "acquire", "--holder", "container:busybox", *ids)
        say("   busybox layers pulled and held by container:busybox")
        for name in others:
            time.sleep(1.1)  # older than the grace period by the time the next pull lands
            fetch(peer, origin.url(name), out / name)
        time.sleep(0.5)
        say(f"   pulled {len(others)} other image layers ({sum(others.values()) // MB} MB); GC report:")
        report = dfctl(peer, "gc", "report", "--limit", "20")
        evicted = [e for run in report["runs"] for e in run["evicted"]]
        say(f"   GC runs: {len(report['runs'])}, tasks evicted: {len(evicted)} (least recently used first)")
        cached = {t["task_id"] for t in dfctl(peer, "task", "ls")["tasks"]}
        say(f"   busybox layers still cached: {all(i in cached for i in ids)}")
        say()
        say(dfctl(peer, "gc", "report", as_json=False).rstrip())
        say()
        say(dfctl(peer, "usage", as_json=False).rstrip())
        say()
        with_containerd = containerd_step(stack, state, sockets, scheduler)
        if args.once:
            return 0 if identical and all(i in cached for i in ids) and with_containerd is not False else 1
        say("The cluster stays up. Try, for example:")
        say(f"  {BIN / 'dfctl'} -e {peer.socket_path} task ls")
        say(f"  {BIN / 'dfctl'} -e {peer.socket_path} use ls")
        say(f"  {BIN / 'dfget'} {origin.url('model.bin')} -O /tmp/model.bin -e {peers[1].socket_path}")
        say(f"  {BIN / 'grpcurl'} -plaintext {peers[0].upload_address} list")
        say("Ctrl-C stops it.")
        try:
            while all(p.proc.poll() is None for p in peers):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
