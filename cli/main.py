"""`robustpart`: the command-line front. Parse, call the library, print."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from robustpart.errors import RobustpartError

DEMO_MODEL = "fmnist_vgg16_bn"


class ProgressLine:
    """A one-line counter on stderr, rewritten in place on a terminal, throttled to lines elsewhere."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.tty, self.last = quiet, sys.stderr.isatty(), 0.0
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if self.tty:
            sys.stderr.write(f"\r\033[K[{now - self.start:6.1f}s] {message}")
            sys.stderr.flush()
        elif now - self.last >= 2.0 or "set" not in message:
            sys.stderr.write(f"[{now - self.start:6.1f}s] {message}\n")
            self.last = now

    def done(self) -> None:
        if self.tty and not self.quiet:
            sys.stderr.write("\r\033[K")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robustpart", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="score, plan and write a bundle for N boards")
    c.add_argument("model", help="reference model, torchvision model name, or path to a saved model")
    c.add_argument("--devices", "-n", type=int, default=4, help="number of boards (default 4)")
    c.add_argument("--threshold", "-t", type=float, default=0.3,
                   help="robust: clustering distance threshold in normalised score space; 0 = full "
                        "replication, large = even split (default 0.3)")
    c.add_argument("--thresholds-file", type=Path, help="JSON: unit name or pattern -> threshold, plus \"default\"")
    c.add_argument("--method", default="robust", help="robust, lop, full or random (default robust)")
    c.add_argument("--scores", type=_names,
                   help="importance criteria, comma-separated (default l1,taylor,jsd; l1 alone when there are no "
                        "calibration images)")
    c.add_argument("--jsd", choices=["auto", "exact", "fast"], default="auto",
                   help="JSD scores by exact channel ablation, a fast linearised-logit approximation, or auto: exact when "
                        "affordable (default auto; the choice is shown)")
    c.add_argument("--calib", type=int, default=64, help="calibration images for data-driven scores")
    c.add_argument("--calib-data", type=Path, help="image folder for calibration (default: bundled Fashion-MNIST)")
    c.add_argument("--weights", help="torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), a state_dict file, "
                                     "or none")
    c.add_argument("--input-shape", type=_int_list, help="C,H,W for a model given by path")
    c.add_argument("--mean", type=_float_list, help="normalisation mean (one or per channel)")
    c.add_argument("--std", type=_float_list, help="normalisation std (one or per channel)")
    c.add_argument("--num-classes", type=int, help="number of classes of a model given by path")
    c.add_argument("--replicate", type=_names, default=[], help="units (fnmatch patterns) to put whole on every board")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--reuse-scores", type=Path, help="take the scores from this earlier bundle of the same model")
    c.add_argument("--out", "-o", type=Path, help="bundle directory (default artifacts/<model>-<N>d)")
    c.add_argument("--no-shards", action="store_true", help="write the plan only, no ONNX shards / manifest")
    c.add_argument("--compensate", default="auto",
                   help="failure-aware compensation: ls (affine + least-squares reconstruction of lost channels), "
                        "stats (affine + mean fill), none, or auto = ls when calibration images are at hand "
                        "(default auto)")
    c.add_argument("--compensate-up-to", type=int,
                   help="prepare every failure set of 1..K boards (default N-1 while there are at most 256 sets)")
    c.add_argument("--compensate-calib", type=int, default=256, help="calibration images for compensation (256)")
    c.add_argument("--batch-size", type=int, help="images per batch in scoring and compensation (default: from the "
                                                  "model's activation size)")
    _torch_device_option(c)

    e = sub.add_parser("evaluate", help="accuracy of a bundle's plan under every k-board failure set")
    e.add_argument("bundle", type=Path)
    e.add_argument("--failures", type=_int_list, help="failure set sizes, e.g. 1,2,3 (default 1..N-1)")
    e.add_argument("--data", help="Fashion-MNIST idx folder, image folder, or 'bundled' (default: the "
                                  "Fashion-MNIST test split, else the bundled 2000-image slice)")
    e.add_argument("--limit", type=int, help="evaluate on the first N images only")
    e.add_argument("--compare", type=_names, default=[],
                   help="other methods on the same data, e.g. lop,full,random,robust@0.1")
    e.add_argument("--fail-prob", help="per-board failure probabilities for the expected accuracy (one value or "
                                       "one per board); default: settings normal/poor/hazardous")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="torch: the failure simulator (fast); onnx: run the bundle's shards with ONNX Runtime")
    e.add_argument("--provider", default="cpu", help="ONNX Runtime execution provider: cpu, cuda, tensorrt")
    e.add_argument("--compensation", choices=["both", "with", "without"], default="both",
                   help="each method without and with failure-aware compensation (default both)")
    e.add_argument("--batch-size", type=int,
                   help="images per forward pass (default: from the model's activation size, at most 500)")
    e.add_argument("--workers", type=int,
                   help="processes decoding an image folder in parallel with compute; 0: in the main process "
                        "(default min(2, CPU count))")
    e.add_argument("--torch-device", default="auto",
                   help="where the torch backend runs: auto (CUDA when available), cpu or cuda")

    i = sub.add_parser("inspect", help="per-board memory and MACs, per-unit placement of a bundle")
    i.add_argument("bundle", type=Path)

    d = sub.add_parser("demo", help="compile the reference VGG for 4 boards; robust vs lop vs full under failures")
    d.add_argument("--data", help="evaluation data (default: 'bundled', the 2000-image slice in the package)")
    d.add_argument("--out", type=Path, default=Path("artifacts") / f"{DEMO_MODEL}-4d")

    s = sub.add_parser("serve", help="run one board of a bundle on the mesh (needs numpy, onnxruntime, pyzmq only)")
    s.add_argument("bundle", type=Path)
    s.add_argument("--device", "-d", type=int, required=True, help="this board's id, 0..N-1")
    s.add_argument("--bind", help="listen endpoint (default: the board's inventory port; on all interfaces unless "
                                  "its address is loopback)")
    s.add_argument("--provider", default="cpu", help="ONNX Runtime execution provider: cpu, cuda, tensorrt")
    s.add_argument("--threads", type=int, default=1, help="intra-op threads per shard session (default 1)")
    s.add_argument("--events", type=Path, help="append liveness events (ready, dead, rejoined...) as JSON lines")
    _mesh_options(s)

    r = sub.add_parser("run", help="stream images to the boards; print answers, latency and bytes per image")
    r.add_argument("bundle", type=Path)
    r.add_argument("--input", "-i", default="bundled",
                   help="'bundled' (Fashion-MNIST slice), a .npy/.npz file or an image folder (default bundled)")
    r.add_argument("--limit", type=int, help="send the first N images only")
    r.add_argument("--deadline-ms", type=float, default=5000, help="answer each image by then (default 5000)")
    r.add_argument("--window", type=int, default=1, help="images in flight at once (default 1)")
    r.add_argument("--wait-ms", type=float, default=5000,
                   help="before streaming, wait up to this long for every board to join (default 5000)")
    r.add_argument("--json", action="store_true", help="one JSON line per image, then a JSON summary")
    _mesh_options(r)

    k = sub.add_parser("cluster", help="start all N boards of a bundle as local processes, until Ctrl-C")
    k.add_argument("bundle", type=Path)
    k.add_argument("--workdir", type=Path, help="where the inventory, logs and events go (default: a temp dir)")
    k.add_argument("--seconds", type=float, help="stop after this long (default: run until Ctrl-C)")
    k.add_argument("--provider", default="cpu")
    k.add_argument("--keys", type=Path, help="directory made by `robustpart keys`: use CURVE with its inventory")
    _mesh_options(k)

    g = sub.add_parser("keys", help="make CURVE keys for N boards and a client, and an inventory listing them")
    g.add_argument("out", type=Path, help="directory for the key files and boards.json")
    g.add_argument("--boards", "-n", type=int, required=True)
    g.add_argument("--peers", help="host:port,host:port,... of the boards (default 127.0.0.1:5550+K)")
    g.add_argument("--clients", type=_names, default=["client"], help="client names (default: client)")
    return parser


def _torch_device_option(p) -> None:
    p.add_argument("--torch-device", default="auto", help="where the torch work runs: auto (CUDA when available), "
                                                          "cpu or cuda (default auto)")


def _mesh_options(p) -> None:
    p.add_argument("--peers", help="board inventory: a JSON file or host:port,host:port,... (default: boards.json "
                                   "next to the manifest, else 127.0.0.1:5550+K)")
    p.add_argument("--heartbeat-ms", type=float, help="heartbeat interval (default 100)")
    p.add_argument("--timeout-ms", type=float, help="a board silent this long is declared dead (default 500)")
    p.add_argument("--stage-timeout-ms", type=float, help="how long a stage waits for a live board's slice "
                                                          "(default: --timeout-ms)")
    p.add_argument("--key", type=Path, help="this process's CURVE secret key (when the inventory lists keys)")
    p.add_argument("--client-idle-ms", type=float, help="boards forget a client silent this long (default 60000)")


def _mesh_settings(args):
    from robustpart.runtime.mesh.settings import MeshSettings
    return MeshSettings.from_ms(args.heartbeat_ms, args.timeout_ms, args.stage_timeout_ms, args.client_idle_ms)


def _input_spec(args):
    from robustpart.spec import InputSpec
    given = [args.input_shape, args.mean, args.std]
    if all(v is None for v in given) and args.num_classes is None:
        return None
    if any(v is None for v in given):
        raise RobustpartError("give all of --input-shape, --mean and --std (and --num-classes if the model's "
                              "output does not show it), or none of them")
    return InputSpec(shape=tuple(args.input_shape), mean=args.mean, std=args.std, num_classes=args.num_classes)


def cmd_compile(args, progress) -> int:
    from robustpart.compiler import CompileOptions, compile_model
    from robustpart.device import resolve_device
    if args.threshold is not None and args.threshold < 0:
        raise RobustpartError(f"--threshold must be >= 0 (0 = full replication), got {args.threshold}")
    options = CompileOptions(devices=args.devices, threshold=args.threshold, thresholds_file=args.thresholds_file,
                             method=args.method, criteria=tuple(args.scores) if args.scores else None, calib=args.calib,
                             calib_data=args.calib_data, seed=args.seed, replicate=args.replicate,
                             shards=not args.no_shards, jsd=args.jsd, compensate=args.compensate,
                             compensate_up_to=args.compensate_up_to, compensate_calib=args.compensate_calib,
                             batch_size=args.batch_size, torch_device=str(resolve_device(args.torch_device)))
    out = compile_model(args.model, options, args.out, args.weights, _input_spec(args), args.reuse_scores, progress)
    progress.done()
    print((out / "report.txt").read_text(), end="")
    print(f"bundle written to {out}")
    return 0


def cmd_evaluate(args, progress) -> int:
    from robustpart.evaluate import evaluate_bundle, parse_fail_probs
    from robustpart.bundle import Bundle
    from robustpart.report import evaluation_text
    fail_probs = None
    if args.fail_prob:
        n = Bundle.load(args.bundle).plan.n_boards
        fail_probs = {"custom": parse_fail_probs(args.fail_prob, n)}
    result = evaluate_bundle(args.bundle, args.failures, args.data, args.limit, args.compare, fail_probs, progress,
                             args.backend, args.provider, args.compensation, batch_size=args.batch_size,
                             workers=args.workers, torch_device=args.torch_device)
    progress.done()
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        print(f"model {result.model}")
        print(evaluation_text(result.reports, result.ks, result.data), end="")
        print(f"{result.images} images read once in batches of {result.batch_size}: {result.passes_per_batch} "
              f"forward passes per batch, {result.seconds:.1f} s")
    return 0


def cmd_inspect(args, progress) -> int:
    from robustpart.bundle import Bundle
    bundle = Bundle.load(args.bundle)
    report = bundle.path / "report.txt"
    if not report.is_file():
        raise RobustpartError(f"bundle {bundle.path} has no report.txt; compile it again")
    print(report.read_text(), end="")
    if (bundle.path / "manifest.json").is_file():
        from robustpart.report import shards_text
        from robustpart.runtime import load_manifest
        print()
        print(shards_text(load_manifest(bundle.path)), end="")
    else:
        print("\n(no ONNX shards in this bundle: compiled with --no-shards)")
    return 0


def cmd_demo(args, progress) -> int:
    from robustpart.compiler import CompileOptions, compile_model
    from robustpart.evaluate import evaluate_bundle
    from robustpart.report import evaluation_text
    from robustpart import zoo
    started = time.monotonic()
    out = compile_model(DEMO_MODEL, CompileOptions(devices=4, threshold=0.3), args.out, progress=progress)
    # the bundled slice keeps the demo fast and independent of the Debian package
    result = evaluate_bundle(out, [1, 2, 3], args.data or "bundled", compare=["lop", "full"], progress=progress)
    progress.done()
    print(f"RobustDiCE demo: {DEMO_MODEL} ({zoo.FMNIST_SPEC.num_classes} classes) on 4 boards, bundle {out}")
    print(evaluation_text(result.reports, result.ks, result.data), end="")
    print(f"demo took {time.monotonic() - started:.1f}s")
    return 0


def cmd_serve(args, progress) -> int:
    from robustpart.runtime.mesh.board import serve      # numpy, onnxruntime, pyzmq: no torch on this path
    serve(args.bundle, args.device, args.peers, _mesh_settings(args), args.provider, args.threads, args.key,
          args.bind, args.events)
    return 0


def cmd_run(args, progress) -> int:
    from robustpart.runtime.mesh.client import MeshClient, answer_line, summarize
    from robustpart.runtime.mesh.inputs import load_inputs
    if args.deadline_ms <= 0:
        raise RobustpartError(f"--deadline-ms must be > 0, got {args.deadline_ms:g}")
    if args.limit is not None and args.limit < 1:
        raise RobustpartError(f"--limit must be >= 1, got {args.limit}")
    with MeshClient(args.bundle, args.peers, settings=_mesh_settings(args), deadline=args.deadline_ms / 1e3,
                    key_file=args.key) as client:
        images, labels = load_inputs(args.input, client.manifest, args.limit)
        boards = client.wait_ready(args.wait_ms / 1e3)
        if not boards:
            raise RobustpartError(client.no_boards_reason())
        progress(f"{len(boards)} of {client.n} boards joined ({', '.join(map(str, boards)) or 'none'}); "
                 f"streaming {len(images)} images")
        progress.done()
        answers, started = [], time.monotonic()
        for answer in client.stream((x[None] for x in images), window=args.window):
            answers.append(answer)
            label = None if labels is None else int(labels[answer.index])
            print(answer_line(answer, label, client.manifest, args.json), flush=True)
        summary = summarize(answers, time.monotonic() - started, labels, client.stats)
    print(json.dumps(summary) if args.json else summary["text"])
    return 0 if summary["answered"] == summary["images"] else 1


def cmd_cluster(args, progress) -> int:
    import signal
    from robustpart.runtime.manifest import load_manifest
    from robustpart.runtime.mesh.cluster import LocalCluster
    from robustpart.runtime.mesh.peers import load_inventory
    n = load_manifest(args.bundle, verify=False).boards
    peers = args.peers or (args.keys / "boards.json" if args.keys else None)
    inventory = load_inventory(peers, args.bundle, n)
    cluster = LocalCluster(args.bundle, _mesh_settings(args), inventory, args.workdir, args.provider, args.keys)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        cluster.start().wait_started()
        for b in inventory.boards:
            print(f"board {b.id}: {b.address}  pid {cluster.procs[b.id].pid}  log {cluster.log_file(b.id)}")
        extra = f" --peers {cluster.inventory_file}" if peers else ""
        extra += f" --key {args.keys / 'client.key_secret'}" if args.keys else ""
        print(f"all {n} boards running; try: robustpart run {args.bundle}{extra}   (Ctrl-C stops them)", flush=True)
        end = None if args.seconds is None else time.monotonic() + args.seconds
        while not stopping and (end is None or time.monotonic() < end):
            exited = [k for k, p in cluster.procs.items() if p.poll() is not None]
            if exited:
                raise RobustpartError(f"board {exited[0]} exited; see {cluster.log_file(exited[0])}")
            time.sleep(0.2)
    finally:
        cluster.close()
    return 0


def cmd_keys(args, progress) -> int:
    from robustpart.runtime.mesh.keys import make_keys
    from robustpart.runtime.mesh.peers import load_inventory
    if args.boards < 1:
        raise RobustpartError(f"--boards must be >= 1, got {args.boards}")
    path = make_keys(args.out, args.boards, tuple(args.clients), load_inventory(args.peers, None, args.boards))
    print(f"wrote {path} and the secret keys board0..{args.boards - 1}.key_secret, "
          f"{', '.join(c + '.key_secret' for c in args.clients)} in {args.out}")
    print(f"give board K {path.name} and boardK.key_secret: robustpart serve BUNDLE --device K --peers {path.name} "
          f"--key boardK.key_secret")
    return 0


COMMANDS = {"compile": cmd_compile, "evaluate": cmd_evaluate, "inspect": cmd_inspect, "demo": cmd_demo,
            "serve": cmd_serve, "run": cmd_run, "cluster": cmd_cluster, "keys": cmd_keys}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    progress = ProgressLine(quiet=args.quiet)
    try:
        return COMMANDS[args.command](args, progress)
    except RobustpartError as exc:
        progress.done()
        print(f"robustpart: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        progress.done()
        print("robustpart: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
