"""`robustpart`: the command-line front. Parse, call the library, print."""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
import traceback
from pathlib import Path

from robustpart import checks, options as defaults
from robustpart.errors import ModelError, RobustpartError, Terminated, UsageError, WeightsError
from robustpart.policies import (COMPENSATION, COMPENSATION_ROWS, CRITERIA, DEFAULT_COMPENSATION, DEFAULT_CRITERIA,
                                 EVAL_BACKENDS, JSD_MODES, PARTITIONERS, RECON_DTYPES)
from robustpart.options import BALANCES
from robustpart.plan import MODES, SKIPS
from robustpart.routes import SKIP_WEIGHTS
from robustpart.runtime.mesh.settings import MeshSettings

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
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    return values


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got '{text}'")
    return values


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got '{text}'")
    return names


class _Parser(argparse.ArgumentParser):
    """argparse, but a malformed command line is a UsageError, reported in the one-line form by `main`."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robustpart", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="score, plan and write a bundle for N boards")
    c.add_argument("model", help="reference model, torchvision model name, or path to a saved model")
    c.add_argument("--devices", "-n", type=int, default=defaults.DEFAULT_DEVICES,
                   help=f"number of boards (default {defaults.DEFAULT_DEVICES})")
    c.add_argument("--threshold", "-t", type=float,
                   help="robust: clustering distance threshold in normalised score space; 0 = full "
                        f"replication, large = even split (default {defaults.DEFAULT_THRESHOLD})")
    c.add_argument("--thresholds-file", type=Path, help="JSON: unit name or pattern -> threshold, plus \"default\"")
    c.add_argument("--method", default=defaults.DEFAULT_METHOD,
                   help=f"{PARTITIONERS.choices_help()} (default {defaults.DEFAULT_METHOD})")
    c.add_argument("--scores", type=_names,
                   help=f"importance criteria, comma-separated: {CRITERIA.choices_help()} (default "
                        f"{','.join(DEFAULT_CRITERIA)}; l1 alone when there are no calibration images)")
    c.add_argument("--jsd", choices=JSD_MODES.names(),
                   help=f"how JSD scores are computed: {JSD_MODES.choices_help()} (default {defaults.DEFAULT_JSD_MODE}; "
                        f"the choice is shown)")
    c.add_argument("--calib", type=int,
                   help=f"calibration images for data-driven scores (default {defaults.DEFAULT_CALIB})")
    c.add_argument("--calib-data", type=Path, help="image folder for calibration (default: bundled Fashion-MNIST)")
    c.add_argument("--weights", help="torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), a state_dict file, "
                                     "or none")
    c.add_argument("--input-shape", type=_int_list, help="C,H,W for a model given by path")
    c.add_argument("--mean", type=_float_list, help="normalisation mean (one or per channel)")
    c.add_argument("--std", type=_float_list, help="normalisation std (one or per channel)")
    c.add_argument("--num-classes", type=int, help="number of classes of a model given by path")
    c.add_argument("--replicate", type=_names, default=[], help="units (fnmatch patterns) to put whole on every board")
    c.add_argument("--align", type=int, default=1,
                   help="robust plans: round each board's channels of a unit up to a multiple of N with replicas "
                        "of the most important channels it lacks (8: ONNX Runtime's AVX2 convolution blocks and "
                        "GPU tensor cores compute them anyway; default 1: off)")
    c.add_argument("--split-output", action="store_true",
                   help="split the output layer over the boards like the others (default: whole on every board "
                        "when it is at most 5%% of the model; a lost class logit cannot be rebuilt)")
    c.add_argument("--backups", type=int, help="boards that keep a copy of each board's shards on disk, to take its "
                                               "work over when it dies (default: every other board)")
    c.add_argument("--memory-budget", type=float,
                   help="parameter bytes a board may hold after taking a dead board's work over (<= 1: a fraction "
                        "of the model's); a takeover beyond it is not done (default: no limit)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--reuse-scores", type=Path, help="take the scores from this earlier bundle of the same model")
    c.add_argument("--out", "-o", type=Path, help="bundle directory (default artifacts/<model>-<N>d)")
    c.add_argument("--no-shards", action="store_true", help="write the plan only, no ONNX shards / manifest")
    c.add_argument("--compensate", default="auto",
                   help=f"failure-aware compensation: {COMPENSATION.choices_help()}, none, or auto = "
                        f"{DEFAULT_COMPENSATION} when calibration images are at hand (default auto)")
    c.add_argument("--compensate-up-to", type=int,
                   help="prepare every failure set of 1..K boards (default N-1 while there are at most 256 sets)")
    c.add_argument("--compensate-calib", type=int,
                   help=f"calibration images for compensation (default {defaults.DEFAULT_COMPENSATE_CALIB})")
    c.add_argument("--compensate-dtype", choices=RECON_DTYPES,
                   help=f"how the reconstruction coefficients are stored (default {defaults.DEFAULT_RECON_DTYPE})")
    c.add_argument("--regressors", type=int,
                   help="rebuild each lost channel from its K most correlated surviving channels only (sparse, "
                        "smaller data); default: from all of them")
    c.add_argument("--wire", choices=("fp32", "fp16"), default="fp32",
                   help="precision of the stage slices and cut tensors the boards exchange: fp16 halves the "
                        "bytes; each is rounded where it is computed, so evaluate --backend onnx measures it "
                        "(default fp32)")
    c.add_argument("--batch-size", type=int, help="images per batch in scoring and compensation (default: from the "
                                                  "model's activation size)")
    c.add_argument("--mode", choices=MODES, default=defaults.DEFAULT_MODE,
                   help="horizontal: every unit split over every board; pipeline: consecutive blocks of units, one "
                        "board each; hybrid: blocks on groups of boards, split within the group (default "
                        f"{defaults.DEFAULT_MODE})")
    c.add_argument("--balance", choices=BALANCES,
                   help=f"pipeline / hybrid: cut where the blocks' parameter bytes or MACs are balanced (default "
                        f"{defaults.DEFAULT_BALANCE})")
    c.add_argument("--cuts", type=_names, help="pipeline / hybrid: cut after these units instead (one fewer than "
                                               "the blocks; only where a single tensor crosses)")
    c.add_argument("--groups", help="hybrid: BxG, B blocks of G boards each (default 2 x N/2)")
    c.add_argument("--skip", choices=SKIPS,
                   help="pipeline / hybrid: failover = a dead block's output is rebuilt by a fitted adapter from "
                        "the last live block's (ResiliNet), always = that, and every inner cut also adds the skip "
                        "from the cut before it, weighted (ResiliNet+ / deepFogGuard: changes the no-failure "
                        "output; finetune --failout trains with it), none = it reads zeros (default: failover when "
                        "there are calibration images, else none)")
    c.add_argument("--skip-weights", choices=SKIP_WEIGHTS,
                   help=f"--skip always: ResiliNet's hyperconnection weights: relative = each live connection's "
                        f"reliability over their sum, reliability = its reliability, one = 1 each (default "
                        f"{defaults.DEFAULT_SKIP_WEIGHTS})")
    c.add_argument("--board-failure", type=float,
                   help=f"--skip always: the probability that a board is dead, for the weights (default "
                        f"{defaults.DEFAULT_BOARD_FAILURE}, ResiliNet's normal setting)")
    c.add_argument("--exit-targets", choices=("logits", "labels"),
                   help="pipeline / hybrid: fit the early exits to the model's own logits (default: no labels "
                        "needed) or to the labels of the --calib-data folder's class subfolders")
    c.add_argument("--no-exits", action="store_true",
                   help="pipeline / hybrid: no early exits (a classifier at each cut, answering when every later "
                        "block is dead; default on when there are calibration images)")
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
    e.add_argument("--backend", choices=EVAL_BACKENDS.names(), default="torch",
                   help=f"{EVAL_BACKENDS.choices_help()} (default torch, the fast one)")
    e.add_argument("--provider", help="--backend onnx: ONNX Runtime execution provider: cpu, cuda, tensorrt "
                                      "(default cpu)")
    e.add_argument("--compensation", choices=COMPENSATION_ROWS.names(), default="both",
                   help="rows of each method: without and with failure-aware compensation, or one of them "
                        "(default both)")
    e.add_argument("--batch-size", type=int,
                   help="images per forward pass (default: from the model's activation size, at most 500)")
    e.add_argument("--workers", type=int,
                   help="processes decoding an image folder in parallel with compute; 0: in the main process "
                        "(default min(2, CPU count))")
    e.add_argument("--torch-device",
                   help="where the torch backend runs: auto (CUDA when available), cpu or cuda (default auto)")
    e.add_argument("--plot", type=Path, help="also draw accuracy against failed boards per method (mean, min..max "
                                             "bars, the no-failure line) to FILE.png or FILE.svg")
    e.add_argument("--policy", type=Path, help="a JSON policy (min_accuracy, max_latency_ms, max_downtime_ms, "
                                               "max_memory_bytes, weights): choose compensation or takeover per "
                                               "failure set and write the choices to BUNDLE/techniques.json")

    x = sub.add_parser("explore", help="measure plans and compensation forms that fit a per-board memory budget "
                                       "(compensation counted) on a validation split; write the best as a bundle")
    x.add_argument("model", help="torchvision name, zoo name, or a model file, as for compile")
    x.add_argument("--devices", "-n", type=int, default=defaults.DEFAULT_DEVICES)
    x.add_argument("--memory", type=float, default=0.30,
                   help="the most a board may hold (shard parameters + compensation), as a fraction of the model "
                        "(default 0.30)")
    x.add_argument("--objective", default="k1", help="what the choice maximises: k1..kN-1 (mean accuracy under k "
                                                     "failed boards), worst:kK, expected:normal|poor|hazardous "
                                                     "(default k1)")
    x.add_argument("--val-data", type=Path, help="labelled validation images, not the test set: an image folder, or "
                                                 "a Fashion-MNIST idx folder (its train split; default: Debian's "
                                                 "for a 1x28x28 model)")
    x.add_argument("--val-limit", type=int, default=2000, help="validation images (default 2000)")
    x.add_argument("--steps", type=int, default=4, help="robust plans tried between the even split and the budget "
                                                        "(default 4)")
    x.add_argument("--calib-data", type=Path, help="image folder for calibration (default: bundled Fashion-MNIST)")
    x.add_argument("--scores", type=_names, help=f"importance criteria for the robust plans (default "
                                                 f"{','.join(DEFAULT_CRITERIA)})")
    x.add_argument("--weights", help="as for compile")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--per-unit", type=int, default=0, metavar="ROUNDS",
                   help="then refine the chosen robust plan's threshold per unit, greedily by objective gain per "
                        "byte, for up to ROUNDS moves (default 0: one threshold for every unit)")
    x.add_argument("--out", "-o", type=Path, help="bundle directory (default artifacts/<model>-<N>d-explored)")
    x.add_argument("--plot", type=Path, help="draw memory against the objective, the front and the choice "
                                             "(FILE.png or FILE.svg)")
    x.add_argument("--torch-device", help="auto, cpu or cuda (default cpu)")

    i = sub.add_parser("inspect", help="per-board memory and MACs, per-unit placement of a bundle")
    i.add_argument("bundle", type=Path)

    f = sub.add_parser("finetune", help="failout fine-tuning of a pipeline / hybrid bundle's adapters and exits "
                                        "(needs labels); writes a new bundle")
    f.add_argument("bundle", type=Path)
    f.add_argument("--data", required=True, help="labelled training data: a Fashion-MNIST idx folder (its train "
                                                "split) or an image folder with one sub-folder per class")
    f.add_argument("--failout", type=_float_list, default=(0.1,),
                   help="probability of dropping each block per batch: one rate, or one per block (default 0.1)")
    f.add_argument("--epochs", type=int, default=1, help="passes over the data (default 1)")
    f.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    f.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    f.add_argument("--limit", type=int, help="train on N images only")
    f.add_argument("--whole", action="store_true", help="train the network's weights too (at lr/10), as ResiliNet "
                                                       "trains with failout; the new bundle carries them")
    f.add_argument("--out", "-o", type=Path, help="the new bundle (default BUNDLE-failout)")
    _torch_device_option(f)

    d = sub.add_parser("demo", help="compile the reference VGG for 4 boards; robust vs lop vs full under failures")
    d.add_argument("--data", help="evaluation data (default: 'bundled', the 2000-image slice in the package)")
    d.add_argument("--out", type=Path, default=Path("artifacts") / f"{DEMO_MODEL}-4d",
                   help=f"bundle directory (default artifacts/{DEMO_MODEL}-4d)")

    s = sub.add_parser("serve", help="run one board of a bundle on the mesh (needs numpy, onnxruntime, pyzmq only)")
    s.add_argument("bundle", type=Path)
    s.add_argument("--device", "-d", type=int, required=True, help="this board's id, 0..N-1")
    s.add_argument("--bind", help="listen endpoint (default: the board's inventory port; on all interfaces unless "
                                  "its address is loopback)")
    s.add_argument("--provider", default="cpu", help="ONNX Runtime execution provider: cpu, cuda, tensorrt")
    s.add_argument("--threads", type=int, default=1, help="intra-op threads per shard session (default 1)")
    s.add_argument("--events", type=Path, help="append liveness events (ready, dead, rejoined...) as JSON lines")
    s.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics over HTTP there (PORT alone: "
                                                           "every interface)")
    s.add_argument("--provider-strict", action="store_true",
                   help="refuse to start when the provider cannot run every shard (default: fall back to the CPU "
                        "and say so)")
    s.add_argument("--trt-cache", type=Path, help="where TensorRT keeps its engines (default: BUNDLE.trt-cache "
                                                  "next to the bundle)")
    _mesh_options(s)

    st = sub.add_parser("status", help="a live view of the mesh from this machine: every board up or down, what "
                                       "it hears, what it has taken over, requests it answered")
    st.add_argument("bundle", type=Path)
    st.add_argument("--seconds", type=float, default=1.5, help="how long to listen before printing (default 1.5)")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _mesh_options(st)

    pr = sub.add_parser("profile", help="time board K's shards on this machine and the takeovers it would do; "
                                        "writes profile_K.json next to the manifest")
    pr.add_argument("bundle", type=Path)
    pr.add_argument("--device", "-d", type=int, required=True, help="the board's id, 0..N-1")
    pr.add_argument("--provider", default="cpu", help="ONNX Runtime execution provider: cpu, cuda, tensorrt")
    pr.add_argument("--threads", type=int, default=1, help="intra-op threads per shard session (default 1)")
    pr.add_argument("--repeats", type=int, default=20, help="timed runs per shard (default 20)")
    pr.add_argument("--batch", type=int, default=1, help="images per run (default 1)")
    pr.add_argument("--json", action="store_true", help="print the profile as JSON")

    pk = sub.add_parser("pack", help="what board K needs of a bundle (its shards, those it backs up, the data, "
                                     "the inventory, its key) as a folder or a .tar.gz, with hashes")
    pk.add_argument("bundle", type=Path)
    pk.add_argument("--device", "-d", type=int, required=True, help="the board's id, 0..N-1")
    pk.add_argument("--out", "-o", type=Path, required=True, help="a folder, or FILE.tar.gz")
    pk.add_argument("--peers", type=Path, help="the inventory to include (default: the bundle's boards.json)")
    pk.add_argument("--key", type=Path, help="the board's CURVE secret key file to include")
    up = sub.add_parser("unpack", help="extract a board's .tar.gz pack to a folder, checking every file's hash")
    up.add_argument("archive", type=Path)
    up.add_argument("--out", "-o", type=Path, required=True)

    vf = sub.add_parser("verify", help="check a board's pack (every file against PACK.json) or a bundle (every "
                                       "file the manifest names, by SHA-256)")
    vf.add_argument("folder", type=Path)

    dp = sub.add_parser("deploy", help="copy each board's pack over SSH (rsync), check it on the board, and "
                                       "(re)start its service; a second run copies nothing")
    dp.add_argument("bundle", type=Path)
    dp.add_argument("--inventory", "-i", type=Path, required=True,
                    help="boards.json: each board's mesh address and, optionally, \"ssh\": \"user@host:port\", "
                         "\"dir\", \"robustpart\"")
    dp.add_argument("--user", help="SSH login for boards whose inventory entry names none")
    dp.add_argument("--identity", type=Path, help="the SSH private key (ssh -i)")
    dp.add_argument("--ssh-option", "-o", action="append", default=[], metavar="OPTION",
                    help="an ssh -o option, e.g. StrictHostKeyChecking=accept-new (repeatable)")
    dp.add_argument("--dir", help="the folder on each board (default: robustpart/BUNDLE_NAME in the home)")
    dp.add_argument("--robustpart", default="robustpart",
                    help="the robustpart program on the boards (default: robustpart, on the login PATH)")
    dp.add_argument("--keys", type=Path, help="the folder `robustpart keys` wrote: board K gets boardK.key_secret")
    dp.add_argument("--boards", type=_int_list, help="deploy these boards only (default: all)")
    dp.add_argument("--start", action="store_true", help="start each board's service where it does not run, "
                                                         "restart it where its files changed")
    dp.add_argument("--restart", action="store_true", help="restart every board's service")
    dp.add_argument("--stop", action="store_true", help="stop every board's service (SIGTERM: it leaves the "
                                                        "mesh cleanly); copies nothing")
    dp.add_argument("--service", choices=["systemd", "process"], default="systemd",
                    help="systemd (a unit, restarted on failure; needs root or passwordless sudo) or process "
                         "(a background process, for machines without systemd); default systemd")
    dp.add_argument("--metrics-port", type=int, help="each board serves Prometheus metrics on this port")
    dp.add_argument("--provider", default="cpu", help="the boards' ONNX Runtime provider: cpu, cuda, tensorrt")
    dp.add_argument("--provider-strict", action="store_true", help="boards refuse to start on a provider fallback")
    dp.add_argument("--dry-run", "-n", action="store_true",
                    help="say what would be copied, started or stopped; change nothing")

    u = sub.add_parser("unit", help="print the systemd unit that runs board K of a bundle as a service")
    u.add_argument("bundle", type=Path)
    u.add_argument("--device", "-d", type=int, required=True, help="the board's id, 0..N-1")
    u.add_argument("--peers", help="the inventory the board reads (boards.json, or host:port,...; default: the "
                                   "bundle's)")
    u.add_argument("--user", help="the account the service runs as")
    u.add_argument("--provider", default="cpu", help="ONNX Runtime execution provider: cpu, cuda, tensorrt")
    u.add_argument("--threads", type=int, default=1, help="intra-op threads per shard session (default 1)")
    u.add_argument("--key", type=Path, help="the board's CURVE secret key file")
    u.add_argument("--events", type=Path, help="where the board appends its liveness events")
    u.add_argument("--executable", help="the robustpart program the unit runs (default: this one)")
    u.add_argument("--metrics", metavar="HOST:PORT", help="the board serves Prometheus metrics there")
    u.add_argument("--provider-strict", action="store_true", help="the board refuses to start on a provider "
                                                                  "fallback")

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
    mesh = MeshSettings()
    p.add_argument("--heartbeat-ms", type=float, help=f"heartbeat interval (default {mesh.heartbeat * 1e3:g})")
    p.add_argument("--timeout-ms", type=float,
                   help=f"a board silent this long is declared dead (default {mesh.timeout * 1e3:g})")
    p.add_argument("--stage-timeout-ms", type=float, help="how long a stage waits for a live board's slice "
                                                          "(default: --timeout-ms)")
    p.add_argument("--key", type=Path, help="this process's CURVE secret key (when the inventory lists keys)")
    p.add_argument("--client-idle-ms", type=float,
                   help=f"boards forget a client silent this long (default {mesh.client_idle * 1e3:g})")
    p.add_argument("--no-takeover", action="store_true",
                   help="boards do not load a dead board's shards from their disk to compute its channels "
                        "(the answers stay the compensated ones until it is back)")


def _mesh_settings(args):
    return MeshSettings.from_ms(args.heartbeat_ms, args.timeout_ms, args.stage_timeout_ms, args.client_idle_ms,
                                takeover=not getattr(args, "no_takeover", False))


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
    from robustpart.compiler import compile_model
    from robustpart.device import resolve_device
    from robustpart.options import CompileOptions
    default = CompileOptions()

    def given_or_default(name):
        value = getattr(args, name)
        return getattr(default, name) if value is None else value

    options = CompileOptions(devices=args.devices, threshold=given_or_default("threshold"),
                             thresholds_file=args.thresholds_file, method=args.method,
                             criteria=tuple(args.scores) if args.scores else None, calib=given_or_default("calib"),
                             calib_data=args.calib_data, seed=args.seed, replicate=args.replicate, align=args.align,
                             split_output=args.split_output, wire=args.wire,
                             compensate_dtype=args.compensate_dtype or defaults.DEFAULT_RECON_DTYPE,
                             compensate_regressors=args.regressors or 0,
                             shards=not args.no_shards, jsd=given_or_default("jsd"), compensate=args.compensate,
                             compensate_up_to=args.compensate_up_to,
                             compensate_calib=given_or_default("compensate_calib"), batch_size=args.batch_size,
                             torch_device=str(resolve_device(args.torch_device)), mode=args.mode,
                             balance=given_or_default("balance"), cuts=args.cuts, groups=args.groups,
                             skip=given_or_default("skip"), skip_weights=given_or_default("skip_weights"),
                             board_failure=given_or_default("board_failure"), exits=False if args.no_exits else None,
                             exit_targets=given_or_default("exit_targets"),
                             backups=args.backups, memory_budget=args.memory_budget)
    out = compile_model(args.model, options, args.out, args.weights, _input_spec(args), args.reuse_scores, progress)
    progress.done()
    print((out / "report.txt").read_text(), end="")
    print(f"bundle written to {out}")
    return 0


def cmd_evaluate(args, progress) -> int:
    from robustpart.evaluation import evaluate_bundle, parse_fail_probs
    from robustpart.bundle import Bundle
    from robustpart.report import evaluation_text
    fail_probs = None
    bundle = Bundle.load(args.bundle)
    if args.fail_prob:
        fail_probs = {"custom": parse_fail_probs(args.fail_prob, bundle.plan.n_boards)}
    if args.compensation == "with" and bundle.compensation is None:
        raise UsageError(f"--compensation with: bundle {bundle.path} has no compensation data (compiled with "
                         f"--compensate none, or without calibration images), so every row would be without it")
    result = evaluate_bundle(args.bundle, args.failures, args.data, args.limit, args.compare, fail_probs, progress,
                             args.backend, args.provider or "cpu", args.compensation, batch_size=args.batch_size,
                             workers=args.workers, torch_device=args.torch_device or "auto")
    progress.done()
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        print(f"model {result.model}")
        print(evaluation_text(result.reports, result.ks, result.data), end="")
        print(f"{result.images} images read once in batches of {result.batch_size}: {result.passes_per_batch} "
              f"forward passes per batch, {result.seconds:.1f} s")
    if args.plot:
        from robustpart.plots import plot_failures
        written = plot_failures(result.reports, result.ks, args.plot, f"{result.model} on {result.data}")
        print(f"figure written to {written}", file=sys.stderr if args.json else sys.stdout)
    if args.policy:
        _select_techniques(args, result, sys.stderr if args.json else sys.stdout)
    return 0


def _select_techniques(args, result, out) -> None:
    """evaluate --policy: the candidates per failure set and the choice, written to techniques.json."""
    from robustpart.report import table
    from robustpart.runtime.manifest import load_manifest
    from robustpart.runtime.techniques import Policy, load_profiles, select, write_techniques
    policy, manifest = Policy.load(args.policy), load_manifest(args.bundle)
    own = [r for r in result.reports[:2] if r.plan is result.reports[0].plan]
    report = own[-1]                              # the bundle's plan, with its compensation where it has one
    profiles = load_profiles(args.bundle, manifest.boards)
    rows = select(manifest, report.per_set, result.ks, policy, profiles)
    fmt = lambda v, unit="": "-" if v is None else f"{v:.1f}{unit}"   # noqa: E731
    print(f"technique per failure set ({report.label}; latency and downtime from "
          f"{len(profiles)} of {manifest.boards} board profiles):", file=out)
    print(table(["failed", "technique", "accuracy", "latency", "downtime", "memory", "score", ""],
                [[",".join(map(str, failed)), c.technique, f"{100 * c.accuracy:.2f}%", fmt(c.latency_ms, " ms"),
                  fmt(c.downtime_ms, " ms"), f"{c.memory_bytes / 1e6:.2f} MB", f"{c.score:.3f}",
                  "CHOSEN" + ("" if c.meets else " (no candidate meets the policy)") if c is chosen else c.why]
                 for failed, options, chosen in rows for c in options]), file=out)
    path = write_techniques(args.bundle, policy, {failed: chosen.technique for failed, _, chosen in rows})
    print(f"choices written to {path}: the boards apply them (no takeover where it says compensate or bypass; "
          f"a failure set it does not list: takeover where a backup can)", file=out)


def cmd_explore(args, progress) -> int:
    from robustpart.device import resolve_device
    from robustpart.emit import emit_bundle
    from robustpart.explore import explore, front_text
    from robustpart.options import CompileOptions
    options = CompileOptions(devices=args.devices, calib_data=args.calib_data, seed=args.seed,
                             criteria=tuple(args.scores) if args.scores else None,
                             torch_device=str(resolve_device(args.torch_device)))
    result, graph, source = explore(args.model, options, args.memory, args.objective, args.val_data, args.val_limit,
                                    args.steps, args.weights, progress, per_unit=args.per_unit)
    out = args.out or Path("artifacts") / f"{graph.name}-{args.devices}d-explored"
    chosen = result.chosen
    bundle = emit_bundle(out, graph, source, chosen.plan, result.scores, True, progress, chosen.compensation,
                         f"explore: {chosen.label}, chosen on {result.validation}")
    progress.done()
    print(front_text(result), end="")
    print(f"chosen: {chosen.label} (memory {chosen.memory:.3f} x model); bundle written to {bundle.path}")
    if args.plot:
        from robustpart.plots import plot_front
        print(f"figure written to {plot_front(result, args.plot)}")
    return 0


def cmd_finetune(args, progress) -> int:
    from robustpart.device import resolve_device
    from robustpart.finetune import FinetuneOptions, finetune_bundle
    options = FinetuneOptions(failout=tuple(args.failout), epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                              limit=args.limit, torch_device=str(resolve_device(args.torch_device)),
                              whole=args.whole)
    out = args.out or args.bundle.with_name(args.bundle.name + "-failout")
    bundle = finetune_bundle(args.bundle, out, args.data, options, progress)
    progress.done()
    print((bundle.path / "report.txt").read_text(), end="")
    print(f"bundle written to {bundle.path}")
    return 0


def cmd_inspect(args, progress) -> int:
    from robustpart.bundle import Bundle
    bundle = Bundle.load(args.bundle)
    manifest = bundle.verify()                    # before anything is printed about it
    report = bundle.path / "report.txt"
    if not report.is_file():
        raise RobustpartError(f"bundle {bundle.path} has no report.txt; compile it again")
    print(report.read_text(), end="")
    if manifest is not None:
        from robustpart.report import shards_text
        print()
        print(shards_text(manifest), end="")
    else:
        print("\n(no ONNX shards in this bundle: compiled with --no-shards)")
    return 0


def cmd_demo(args, progress) -> int:
    from robustpart.compiler import compile_model
    from robustpart.evaluation import evaluate_bundle
    from robustpart.options import CompileOptions
    from robustpart.report import evaluation_text
    from robustpart import zoo
    started = time.monotonic()
    out = compile_model(DEMO_MODEL, CompileOptions(devices=4), args.out, progress=progress)
    # the bundled slice keeps the demo fast and independent of the Debian package
    result = evaluate_bundle(out, [1, 2, 3], args.data or "bundled", compare=["lop", "full"], progress=progress)
    progress.done()
    print(f"RobustDiCE demo: {DEMO_MODEL} ({zoo.FMNIST_SPEC.num_classes} classes) on 4 boards, bundle {out}")
    print(evaluation_text(result.reports, result.ks, result.data), end="")
    print(f"demo took {time.monotonic() - started:.1f}s")
    return 0


def cmd_serve(args, progress) -> int:
    from robustpart.runtime.mesh.board import serve      # numpy, onnxruntime, pyzmq: no torch on this path
    if args.key is not None:
        from robustpart.runtime.manifest import load_manifest
        from robustpart.runtime.mesh.peers import load_inventory
        _key_is_used(load_inventory(args.peers, args.bundle, load_manifest(args.bundle, verify=False).boards))
    serve(args.bundle, args.device, args.peers, _mesh_settings(args), args.provider, args.threads, args.key,
          args.bind, args.events, metrics=args.metrics, provider_strict=args.provider_strict,
          trt_cache=args.trt_cache)
    return 0


def cmd_run(args, progress) -> int:
    from robustpart.runtime.mesh.client import MeshClient, answer_line, summarize
    from robustpart.runtime.mesh.inputs import load_inputs
    with MeshClient(args.bundle, args.peers, settings=_mesh_settings(args), deadline=args.deadline_ms / 1e3,
                    key_file=args.key) as client:
        if args.key is not None:
            _key_is_used(client.inventory)
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


def cmd_status(args, progress) -> int:
    from robustpart.runtime.mesh.client import MeshClient
    from robustpart.runtime.mesh.protocol import boards_of
    from robustpart.runtime.techniques import technique_in_use
    with MeshClient(args.bundle, args.peers, settings=_mesh_settings(args), key_file=args.key) as client:
        end = time.monotonic() + args.seconds      # listen the whole time: every board's heartbeats come in
        while (left := end - time.monotonic()) > 0:
            client.pump(left)
        rows, members = client.snapshot(), boards_of(client.members())
        technique = technique_in_use(client.manifest, members, client.machine.covers)
    progress.done()
    if args.json:
        print(json.dumps({"boards": rows, "answering": list(members), "technique": technique}))
    else:
        from robustpart.report import table
        fmt = lambda v: "-" if v is None or v == [] else ",".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
        print(table(["board", "address", "state", "incarnation", "hears", "took over", "answered", "latency",
                     "last heard"],
                    [[str(r["board"]), r["address"], "up" if r["up"] else ("down" if r["incarnation"] else "no answer"),
                      fmt(r["incarnation"]), fmt(r["hears"]), fmt(r["covers"]), fmt(r["served"]),
                      "-" if r["latency_ms"] is None else f"{r['latency_ms']:.1f} ms",
                      "-" if r["last_heard_s"] is None else f"{1e3 * r['last_heard_s']:.0f} ms ago"] for r in rows]))
        print(f"requests go to boards {','.join(map(str, members)) or 'none'} "
              f"({len(members)} of {len(rows)} agree they hear each other); answers use: {technique}")
    return 0 if members else 1


def cmd_profile(args, progress) -> int:
    from robustpart.runtime.profile import profile_board, write_profile
    profile = profile_board(args.bundle, args.device, args.provider, args.threads, args.repeats, args.batch)
    path = write_profile(args.bundle, profile)
    progress.done()
    if args.json:
        print(json.dumps(profile))
        return 0
    from robustpart.report import table
    print(table(["stage", "unit", "ms p50", "ms p90"], [[str(s["stage"]), str(s["unit"]), f"{s['ms_p50']:.3f}",
                                                      f"{s['ms_p90']:.3f}"] for s in profile["stages"]]))
    takeovers = ", ".join(f"board {b} {ms:.1f} ms" for b, ms in profile["takeover_load_ms"].items()) or "none"
    print(f"board {args.device}: {profile['total_ms_p50']:.3f} ms per batch of {args.batch} in its shards "
          f"(p50 sums); sessions opened in {profile['load_ms']:.1f} ms; a takeover loads {takeovers}")
    print(f"written to {path}")
    return 0


def cmd_pack(args, progress) -> int:
    from robustpart.runtime.pack import pack_board
    path = pack_board(args.bundle, args.device, args.out, args.peers, args.key)
    print(f"board {args.device}'s pack written to {path}")
    return 0


def cmd_unpack(args, progress) -> int:
    from robustpart.runtime.pack import PACK_INDEX, unpack
    path = unpack(args.archive, args.out)
    print(f"unpacked to {path}; every file matches {PACK_INDEX}")
    return 0


def cmd_verify(args, progress) -> int:
    from robustpart.runtime.pack import PACK_INDEX, check_pack
    if (args.folder / PACK_INDEX).is_file():
        index = check_pack(args.folder)
        print(f"{args.folder}: board {index['board']}'s pack, {len(index['files'])} files match {PACK_INDEX}")
        return 0
    from robustpart.runtime.manifest import bundle_files, load_manifest
    manifest = load_manifest(args.folder)
    print(f"{args.folder}: bundle for {manifest.boards} boards, {len(bundle_files(manifest)) + 1} files, every "
          f"SHA-256 matches its manifest")
    return 0


def cmd_deploy(args, progress) -> int:
    from robustpart.runtime.deploy import Deployer, result_line, targets
    chosen = targets(args.inventory, args.bundle, args.user, args.dir, args.robustpart)
    if args.boards is not None:
        unknown = sorted(set(args.boards) - {t.board for t in chosen})
        if unknown:
            raise UsageError(f"--boards: board {unknown[0]} is not in the bundle (boards 0..{len(chosen) - 1})")
        chosen = [t for t in chosen if t.board in args.boards]
    ssh = [*(["-i", str(args.identity)] if args.identity else []), *(x for o in args.ssh_option for x in ("-o", o))]
    metrics = f"0.0.0.0:{args.metrics_port}" if args.metrics_port else None
    deployer = Deployer(args.bundle, args.inventory, chosen, ssh, args.keys, args.service, args.provider,
                        args.provider_strict, metrics, args.dry_run)
    results = deployer.stop() if args.stop else deployer.deploy(args.start, args.restart)
    progress.done()
    for r in results:
        print(result_line(r, args.dry_run), flush=True)
    failed = [r.board for r in results if r.error]
    if failed:
        print(f"{len(failed)} of {len(results)} boards failed ({','.join(map(str, failed))}); the others are done; "
              f"run deploy again once fixed (it copies only what is missing)", file=sys.stderr)
    return 1 if failed else 0


def cmd_unit(args, progress) -> int:
    from robustpart.runtime.manifest import load_manifest
    from robustpart.runtime.service import systemd_unit
    manifest = load_manifest(args.bundle, boards=[args.device], verify=False)
    print(systemd_unit(args.bundle, args.device, manifest.boards, args.user, peers=args.peers,
                       provider=args.provider, threads=args.threads, key=args.key, events=args.events,
                       executable=args.executable, metrics=args.metrics, provider_strict=args.provider_strict),
          end="")
    return 0


def cmd_keys(args, progress) -> int:
    from robustpart.runtime.mesh.keys import make_keys
    from robustpart.runtime.mesh.peers import load_inventory
    path = make_keys(args.out, args.boards, tuple(args.clients), load_inventory(args.peers, None, args.boards))
    print(f"wrote {path} and the secret keys board0..{args.boards - 1}.key_secret, "
          f"{', '.join(c + '.key_secret' for c in args.clients)} in {args.out}")
    print(f"give board K {path.name} and boardK.key_secret: robustpart serve BUNDLE --device K --peers {path.name} "
          f"--key boardK.key_secret")
    return 0


def _key_is_used(inventory) -> None:
    if not inventory.curve:
        raise RobustpartError(f"--key is given but the board inventory ({inventory.source}) lists no CURVE keys, so it "
                              f"would not be used; drop --key, or give the inventory `robustpart keys` wrote (--peers "
                              f"DIR/boards.json)")


COMMANDS = {"compile": cmd_compile, "evaluate": cmd_evaluate, "inspect": cmd_inspect, "finetune": cmd_finetune,
            "explore": cmd_explore,
            "demo": cmd_demo,
            "serve": cmd_serve, "run": cmd_run, "cluster": cmd_cluster, "keys": cmd_keys, "unit": cmd_unit,
            "status": cmd_status, "profile": cmd_profile, "pack": cmd_pack, "unpack": cmd_unpack,
            "verify": cmd_verify, "deploy": cmd_deploy}


# ---- the boundary: every argument checked before the command runs (and before torch is imported) -------------

TORCH_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
PROVIDERS = ("cpu", "cuda", "tensorrt")
CLIENT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def _given(args, *names: str) -> list[str]:
    """The options among `names` (attribute names) the user gave, spelled as on the command line."""
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n) not in (None, False, [])]


def _refuse_unused(given: list[str], why: str) -> None:
    if given:
        raise UsageError(f"{', '.join(given)} would not be used: {why}; drop {'it' if len(given) == 1 else 'them'}")


def _check_torch_device(value: str | None) -> None:
    if value is not None and not TORCH_DEVICE.fullmatch(value.lower()):
        raise UsageError(f"unknown --torch-device '{value}'; choose one of auto, cpu, cuda (or cuda:N)")


def _check_provider(value: str | None) -> None:
    if value is not None and value.lower() not in PROVIDERS and not value.endswith("ExecutionProvider"):
        raise UsageError(f"unknown --provider '{value}'; use {', '.join(PROVIDERS)}")


def _check_data(value: str | None, option: str = "--data") -> None:
    if value is not None and value != "bundled":
        checks.check_existing(value, option, error=UsageError)


def _check_mesh(args) -> None:
    for name in ("heartbeat_ms", "timeout_ms", "stage_timeout_ms", "client_idle_ms"):
        value = getattr(args, name)
        if value is not None:
            checks.check_number(value, "--" + name.replace("_", "-"), 0, strict=True, error=UsageError)
    _mesh_settings(args)                                  # the relations between them (heartbeat < timeout, ...)
    if getattr(args, "key", None) is not None:
        checks.check_existing(args.key, "--key", "file", error=UsageError)
    if args.peers is not None:
        from robustpart.runtime.mesh.peers import is_address_list, parse_address_list
        if is_address_list(args.peers):
            parse_address_list(args.peers)


def check_compile(args) -> None:
    checks.check_compile_numbers(args.devices, args.threshold, args.calib, args.compensate_calib,
                                 args.compensate_up_to, args.batch_size, args.seed)
    checks.check_compile_method(args.method)
    _check_torch_device(args.torch_device)
    if args.method != "robust":
        _refuse_unused(_given(args, "threshold", "thresholds_file", "scores", "jsd", "calib", "reuse_scores"),
                       f"--method {args.method} places channels without scores or thresholds (they are for "
                       f"--method robust)")
    if args.regressors is not None:
        checks.check_int(args.regressors, "--regressors", 1, hint=" (surviving channels per lost channel)",
                         error=UsageError)
    if args.compensate == "none":
        _refuse_unused(_given(args, "compensate_up_to", "compensate_calib", "compensate_dtype", "regressors"),
                       "--compensate none prepares no compensation")
    if args.skip != "always":
        _refuse_unused(_given(args, "skip_weights", "board_failure"), "they weigh the hyperconnections of --skip always")
    if args.mode == "horizontal":
        _refuse_unused(_given(args, "balance", "cuts", "groups", "skip", "exit_targets")
                       + (["--no-exits"] if args.no_exits else []),
                       "they shape pipeline and hybrid plans (--mode pipeline|hybrid)")
    elif args.mode == "pipeline":
        _refuse_unused(_given(args, "groups", "threshold", "thresholds_file", "scores", "jsd", "calib",
                              "reuse_scores", "replicate")
                       + (["--method"] if args.method != defaults.DEFAULT_METHOD else []),
                       "--mode pipeline puts each block whole on one board: nothing is scored or split")
    if args.cuts is not None:
        _refuse_unused(_given(args, "balance"), "--cuts names the cut points")
    if args.no_exits:
        _refuse_unused(_given(args, "exit_targets"), "--no-exits leaves no exits to fit")
    if args.scores and set(args.scores) == {"l1"}:
        _refuse_unused(_given(args, "calib", "jsd"), "--scores l1 scores from the weights alone")
    elif args.scores and "jsd" not in args.scores:
        _refuse_unused(_given(args, "jsd"), f"--scores {','.join(args.scores)} has no jsd")
    if args.calib_data is not None and str(args.calib_data) != "synthesize":
        checks.check_existing(args.calib_data, "--calib-data", "dir", error=UsageError)
    if args.thresholds_file is not None:
        checks.check_existing(args.thresholds_file, "--thresholds-file", "file", error=UsageError)
    if args.reuse_scores is not None:
        checks.check_bundle_dir(args.reuse_scores)
    path = Path(args.model)
    if (path.suffix or "/" in args.model) and not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if args.weights not in (None, "default", "DEFAULT", "none") and (Path(args.weights).suffix or "/" in args.weights) \
            and not Path(args.weights).is_file():
        raise WeightsError(f"weights file {args.weights} does not exist; give an existing state_dict file, a "
                           f"torchvision weights name, or none")
    _input_spec(args)                                     # shape, mean, std and classes, all or none
    if args.out is not None:
        checks.check_output_dir(args.out)


def check_evaluate(args) -> None:
    checks.check_bundle_dir(args.bundle)
    for k in args.failures or ():
        checks.check_int(k, "--failures", 1, hint=" (failure set sizes, e.g. 1,2,3)", error=UsageError)
    for name, low in (("limit", 1), ("batch_size", 1), ("workers", 0)):
        if getattr(args, name) is not None:
            checks.check_int(getattr(args, name), "--" + name.replace("_", "-"), low, error=UsageError)
    if args.fail_prob is not None:
        checks.check_fail_probs(args.fail_prob)
    _check_data(args.data)
    _check_torch_device(args.torch_device)
    _check_provider(args.provider)
    if args.plot is not None:
        from robustpart.plots import check_plot_path
        check_plot_path(args.plot)
    if args.policy is not None:
        _check_policy(args)
    if args.backend == "onnx":
        _refuse_unused(_given(args, "torch_device"), "--backend onnx runs the shards with ONNX Runtime (--provider)")
        if args.compare:
            raise UsageError("--compare plans have no shards; evaluate them with --backend torch")
    else:
        _refuse_unused(_given(args, "provider"), "--backend torch runs the simulator (--torch-device); --provider "
                       "is for --backend onnx")


def _check_policy(args) -> None:
    from robustpart.runtime.manifest import MANIFEST
    from robustpart.runtime.techniques import Policy
    checks.check_existing(args.policy, "--policy", "file", error=UsageError)
    Policy.load(args.policy)
    if not (args.bundle / MANIFEST).is_file():
        raise UsageError(f"--policy: bundle {args.bundle} has no shards (compiled with --no-shards), so no board "
                         f"would apply the choices")
    if args.compensation == "without":
        raise UsageError("--policy compares the compensated answer with a takeover; drop --compensation without")


def check_inspect(args) -> None:
    checks.check_bundle_dir(args.bundle)


def check_explore(args) -> None:
    from robustpart.explore import check_objective
    checks.check_int(args.devices, "--devices", 2, hint=" (boards to explore plans for)", error=UsageError)
    if not 0 < args.memory <= 1:
        raise UsageError(f"--memory must be in (0, 1] (a fraction of the model's parameter bytes), got {args.memory}")
    check_objective(args.objective, args.devices)
    for name, low in (("val_limit", 1), ("steps", 1), ("per_unit", 0)):
        checks.check_int(getattr(args, name), "--" + name.replace("_", "-"), low, error=UsageError)
    if args.val_data is not None:
        checks.check_existing(args.val_data, "--val-data", "dir", error=UsageError)
    if args.calib_data is not None:
        checks.check_existing(args.calib_data, "--calib-data", "dir", error=UsageError)
    if args.out is not None:
        checks.check_output_dir(args.out)
    if args.plot is not None:
        from robustpart.plots import check_plot_path
        check_plot_path(args.plot)
    _check_torch_device(args.torch_device)


def check_finetune(args) -> None:
    checks.check_bundle_dir(args.bundle)
    _check_torch_device(args.torch_device)
    for name in ("epochs", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a number > 0, got {args.lr}")
    if any(not 0 <= r < 1 for r in args.failout):
        raise UsageError(f"--failout rates must be in [0, 1), got {','.join(map(str, args.failout))}")
    if not Path(args.data).exists():
        raise UsageError(f"--data {args.data} does not exist")
    if args.out is not None:
        checks.check_output_dir(args.out)


def check_demo(args) -> None:
    _check_data(args.data)
    checks.check_output_dir(args.out)


def _check_board(args) -> None:
    """What serve and unit share: the bundle, the board id, its threads and execution provider."""
    checks.check_bundle_dir(args.bundle)
    checks.check_int(args.device, "--device", 0, hint=" (the board's id)", error=UsageError)
    checks.check_int(args.threads, "--threads", 1, error=UsageError)
    _check_provider(args.provider)


def check_serve(args) -> None:
    _check_board(args)
    if args.events is not None:
        checks.check_output_file(args.events, "--events")
    if args.bind is not None and not re.fullmatch(r"tcp://(\*|\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):\d{1,5}", args.bind):
        raise UsageError(f"--bind {args.bind!r} is not a listen endpoint like tcp://0.0.0.0:5550")
    if args.metrics is not None:
        from robustpart.runtime.mesh.metrics import parse_metrics_address
        parse_metrics_address(args.metrics)
    _check_mesh(args)


def check_pack(args) -> None:
    checks.check_bundle_dir(args.bundle)
    checks.check_int(args.device, "--device", 0, hint=" (the board's id)", error=UsageError)
    for option, path in (("--peers", args.peers), ("--key", args.key)):
        if path is not None:
            checks.check_existing(path, option, "file", error=UsageError)
    checks.check_output_dir(args.out.parent if args.out.name.endswith(".tar.gz") else args.out, "--out",
                            replaces=not args.out.name.endswith(".tar.gz"))


def check_unpack(args) -> None:
    checks.check_existing(args.archive, "archive", "file", error=UsageError)
    checks.check_output_dir(args.out, "--out")


def check_verify(args) -> None:
    checks.check_existing(args.folder, "folder", "dir", error=UsageError)


def check_deploy(args) -> None:
    checks.check_bundle_dir(args.bundle)
    checks.check_existing(args.inventory, "--inventory", "file", error=UsageError)
    for option, path, kind in (("--identity", args.identity, "file"), ("--keys", args.keys, "dir")):
        if path is not None:
            checks.check_existing(path, option, kind, error=UsageError)
    if sum([args.start, args.restart, args.stop]) > 1:
        raise UsageError("give one of --start, --restart and --stop")
    if args.user is not None and not re.fullmatch(r"[a-z_][a-z0-9_.-]*\$?", args.user):
        raise UsageError(f"--user {args.user!r} is not an account name")
    if args.metrics_port is not None:
        checks.check_int(args.metrics_port, "--metrics-port", 1, 65535, error=UsageError)
    if args.stop:
        _refuse_unused(_given(args, "metrics_port", "provider_strict"), "--stop copies and starts nothing")
    _check_provider(args.provider)
    if args.keys is not None:
        missing = [b for b in range(_bundle_boards(args.bundle)) if not (args.keys / f"board{b}.key_secret").is_file()]
        if missing:
            raise UsageError(f"--keys {args.keys} has no board{missing[0]}.key_secret; give the folder `robustpart "
                             f"keys` wrote for this bundle's boards")


def _bundle_boards(bundle: Path) -> int:
    from robustpart.runtime.manifest import load_manifest
    return load_manifest(bundle, verify=False).boards


def check_profile(args) -> None:
    _check_board(args)
    checks.check_int(args.repeats, "--repeats", 1, error=UsageError)
    checks.check_int(args.batch, "--batch", 1, error=UsageError)


def check_status(args) -> None:
    checks.check_bundle_dir(args.bundle)
    if not 0 < args.seconds <= 600:
        raise UsageError(f"--seconds must be in (0, 600], got {args.seconds:g}")
    _check_mesh(args)


def check_unit(args) -> None:
    _check_board(args)
    if args.key is not None:
        checks.check_existing(args.key, "--key", "file", error=UsageError)
    if args.user is not None and not re.fullmatch(r"[a-z_][a-z0-9_-]*\$?", args.user):
        raise UsageError(f"--user {args.user!r} is not an account name")
    if args.metrics is not None:
        from robustpart.runtime.mesh.metrics import parse_metrics_address
        parse_metrics_address(args.metrics)


def check_run(args) -> None:
    checks.check_bundle_dir(args.bundle)
    _check_data(args.input, "--input")
    if args.limit is not None:
        checks.check_int(args.limit, "--limit", 1, error=UsageError)
    checks.check_number(args.deadline_ms, "--deadline-ms", 0, strict=True, error=UsageError)
    checks.check_int(args.window, "--window", 1, error=UsageError)
    checks.check_number(args.wait_ms, "--wait-ms", 0, error=UsageError)
    _check_mesh(args)


def check_cluster(args) -> None:
    checks.check_bundle_dir(args.bundle)
    if args.workdir is not None:
        checks.check_output_dir(args.workdir, "--workdir", replaces=False)
    if args.seconds is not None:
        checks.check_number(args.seconds, "--seconds", 0, strict=True, error=UsageError)
    _check_provider(args.provider)
    if args.keys is not None:
        checks.check_existing(args.keys, "--keys", "dir", error=UsageError)
        checks.check_existing(args.keys / "boards.json", "--keys", "file", error=UsageError)
    _check_mesh(args)


def check_keys(args) -> None:
    checks.check_devices(args.boards, "--boards")
    checks.check_output_dir(args.out, "keys DIR", replaces=False)
    seen = set()
    for name in args.clients:
        if not CLIENT_NAME.fullmatch(name) or re.fullmatch(r"board\d+", name):
            raise UsageError(f"--clients: '{name}' is not a client name (letters, digits, _ and -, starting with a "
                             f"letter; not boardK, which are the boards' keys)")
        if name in seen:
            raise UsageError(f"--clients names '{name}' twice")
        seen.add(name)
    if args.peers is not None:
        from robustpart.runtime.mesh.peers import load_inventory
        load_inventory(args.peers, None, args.boards)


CHECKS = {"compile": check_compile, "evaluate": check_evaluate, "inspect": check_inspect, "finetune": check_finetune,
          "explore": check_explore,
          "demo": check_demo,
          "serve": check_serve, "run": check_run, "cluster": check_cluster, "keys": check_keys, "unit": check_unit,
          "status": check_status, "profile": check_profile, "pack": check_pack, "unpack": check_unpack,
          "verify": check_verify, "deploy": check_deploy}


# ---- the one place an exception becomes the one-line form -------------------------------------------------------

def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def report_error(exc: BaseException, verbose: bool = False) -> int:
    """Print `exc` as one line on stderr and return the exit status: 2 for bad input (a RobustpartError), 1 for
    what the system refused (an OSError: disk full, permission denied) and for bugs (with the traceback only
    under -v), 130 for Ctrl-C, 128 + the signal for SIGTERM."""
    if isinstance(exc, Terminated):
        print(f"robustpart: terminated (signal {exc.signum}); nothing half-written was left", file=sys.stderr)
        return exc.code
    if isinstance(exc, KeyboardInterrupt):
        print("robustpart: interrupted", file=sys.stderr)
        return 130
    if verbose and not isinstance(exc, RobustpartError):
        traceback.print_exception(exc)
    if isinstance(exc, RobustpartError):
        print(f"robustpart: error: {one_line(exc)}", file=sys.stderr)
        return 2
    if isinstance(exc, OSError) or type(exc).__module__.startswith("zmq"):    # the system refused
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"robustpart: error: {getattr(exc, 'strerror', None) or one_line(exc)}{where}", file=sys.stderr)
        return 1
    hint = "" if verbose else "; -v shows the traceback"
    print(f"robustpart: error: internal error, please report it: {type(exc).__name__}: {one_line(exc)}{hint}",
          file=sys.stderr)
    return 1


TORCH_COMMANDS = {"compile", "evaluate", "explore", "finetune", "demo"}   # run tensors of activation size


def main(argv: list[str] | None = None) -> int:
    """The command line; `argv` None: this process's arguments (the program's entry, which may re-execute
    itself once for huge pages before a torch command, see robustpart/hugepages.py)."""
    entry = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = "-v" in argv or "--verbose" in argv
    progress = ProgressLine(quiet=True)
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        progress = ProgressLine(quiet=args.quiet)
        CHECKS[args.command](args)
        if entry and args.command in TORCH_COMMANDS:
            from robustpart.hugepages import reexec_if_useful
            reexec_if_useful()
        return COMMANDS[args.command](args, progress)
    except SystemExit as exc:
        if isinstance(exc, Terminated):
            progress.done()
            return report_error(exc, verbose)
        if exc.code is None or isinstance(exc.code, int):       # --help: 0
            return exc.code or 0
        return report_error(RobustpartError(str(exc.code)), verbose)
    except BaseException as exc:          # noqa: BLE001  the one place errors become the one-line form
        progress.done()
        return report_error(exc, verbose)


if __name__ == "__main__":
    sys.exit(main())
