"""Federation costs: bytes a clinic uploads per round, and coordinator time per round.

    python benchmarks/federation.py [--bundle DIR] [--clinics 4,16] [--rounds 2] [--json]

What is measured (nothing is estimated):

* Upload per clinic per round: the real ClientApp (`client.app`, Akida software backend) runs
  on synthetic clinics behind an in-process Grid that pushes every message through Flower's
  own serialisation (`server.loopback`), so the byte counts are the sizes of the objects
  Flower transfers (message, records, arrays, chunks; TLS/HTTP framing not included).
  Compared with: the same head sent as float32 arrays, and the whole model (the packed
  bundle in one message), and with the lower bound `head parameters x weight bits / 8`.
* The same messages built for larger heads (feature dims other than the bundle's) with the
  real protocol encoder, to show how the fixed per-message overhead amortises.
* Coordinator time per round with 4 and 16 clinics: wall time of the round minus the time
  spent inside the clinics' handlers, i.e. message building and (de)serialisation,
  validation, dequantization, Flower's aggregation, and the signed audit-log writes.

Default bundle: the shipped v2 bundle (about two minutes on two cores); the synthetic clinics'
images are only there to drive real rounds, so their accuracy figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

from qana.cli_errors import at_least, int_list  # noqa: E402


def message_bytes(content, message_type: str = "train") -> int:
    from flwr.app import Message

    from server.loopback import LoopbackGrid, roundtrip

    LoopbackGrid({})  # gives this process the task identity Flower messages need
    _, size = roundtrip(Message(content, dst_node_id=1, message_type=message_type))
    return size


def encoded_sizes(num_features: int, classes: tuple[str, ...], target: str, bundle_id: str) -> dict[str, float]:
    """Train-reply sizes for a head of this shape: int8 update (the protocol) and float32."""
    from flwr.app import Array, ArrayRecord, RecordDict

    from protocols import messages as P
    from qana.head import Head, quantize_head

    rng = np.random.default_rng(0)
    head = Head(rng.normal(0, 0.01, (num_features, len(classes))).astype(np.float32), rng.normal(0, 0.1, len(classes)).astype(np.float32), classes, 1 / 64)
    spec = P.HeadSpec.from_head(head, target)
    metrics = {P.M_NUM_EXAMPLES: 100, P.M_TRAIN_TOP1: 0.5, P.M_NUM_SYNTHETIC: 10, P.M_DEVICE_AGREEMENT: 1.0}
    info = P.ClinicInfo("clinic-00", P.PROTOCOL_VERSION, bundle_id=bundle_id)
    q_content = P.train_reply_content(quantize_head(head, target), metrics, info)
    f_content = RecordDict(dict(q_content.items()))
    f_content[P.REC_HEAD] = ArrayRecord({"weights": Array(head.weights), "bias": Array(head.bias)})
    payload = sum(a.numpy().nbytes for a in q_content[P.REC_HEAD].values())
    return {
        "feature_dim": num_features,
        "parameters": spec.num_parameters,
        "lower_bound_bytes": spec.lower_bound_bytes,
        "int8_payload_bytes": payload,
        "int8_message_bytes": message_bytes(q_content),
        "float32_message_bytes": message_bytes(f_content),
    }


def run_federation(bundle_dir: Path, n_clinics: int, rounds: int, images: int, work: Path) -> dict:
    """A real run (real ClientApps) on an in-process Grid; returns bytes and timings."""
    from flwr.app import Context, RecordDict
    from synthetic import make_synthetic_ham

    from client.app import app as client_app
    from protocols import messages as P
    from qana.bundle import load_bundle
    from server.audit import AuditLog
    from server.federation import Coordinator, FederationSettings
    from server.loopback import LoopbackGrid

    bundle = load_bundle(bundle_dir)
    size = bundle.input_shape[0]
    handlers = {}
    for i in range(n_clinics):
        data = work / f"n{n_clinics}" / f"clinic-{i:02d}"
        make_synthetic_ham(data, n_images=images, image_size=size, seed=100 + i)
        ctx = Context(
            run_id=1, node_id=i + 1, state=RecordDict(), run_config={},
            node_config={"data-dir": str(data), "clinic-id": f"clinic-{i:02d}", "device": "software", "cache-dir": str(data.parent / f"cache-{i:02d}")},
        )
        handlers[i + 1] = (lambda c: lambda msg: client_app(msg, c))(ctx)
    grid = LoopbackGrid(handlers)
    state = work / f"n{n_clinics}" / "state"
    settings = FederationSettings.from_run_config(
        {"bundle": str(bundle_dir), "num-rounds": rounds, "min-clinics": n_clinics, "local-epochs": 30, "learning-rate": 0.05,
         "state-dir": str(state), "wire-log": True},
        run_id=f"bench-{n_clinics}",
    )
    audit = AuditLog.open(f"sqlite:///{work / f'audit-{n_clinics}.db'}", work / "audit_key.pem")
    t0 = time.perf_counter()
    result = Coordinator(grid, settings, audit).run()
    total = time.perf_counter() - t0
    audit.close()

    wire = [json.loads(line) for line in (state / "wire.jsonl").read_text().splitlines()]
    up = [e for e in wire if e["direction"] == "in" and "wire_bytes" in e]
    by_type: dict[str, list[int]] = {}
    for e in up:
        if e["round"] >= 1:
            by_type.setdefault(e["message_type"], []).append(int(e["wire_bytes"]))
    missing = [t for t in (P.MSG_TRAIN, P.MSG_EVALUATE) if t not in by_type]
    if missing:
        sys.exit(
            f"error: with {n_clinics} clinics of {images} synthetic images each, no clinic sent a reply of type {' or '.join(missing)} "
            "(too few lesions to train or to hold out test images): raise --images (the default, 40, works)"
        )
    one_off = {t: int(np.mean([e["wire_bytes"] for e in up if e["message_type"] == t])) for t in (P.MSG_HELLO, P.MSG_DEPLOY)}
    rounds_out = [
        {
            "round": r.round,
            "clinics": len(r.participants),
            "round_seconds": r.seconds,
            "clinic_seconds": grid.traffic.handler_seconds_by_group.get(str(r.round), 0.0),
            # everything but the clinics: building and (de)serialising messages, validation,
            # dequantization, aggregation, audit writes
            "coordinator_seconds": r.seconds - grid.traffic.handler_seconds_by_group.get(str(r.round), 0.0),
            # of which validation + dequantization + Flower aggregation + audit writes
            "coordinator_logic_seconds": r.server_seconds,
        }
        for r in result.rounds
        if r.round >= 1
    ]
    return {
        "clinics": n_clinics,
        "rounds": rounds,
        "train_reply_bytes": int(np.mean(by_type[P.MSG_TRAIN])),
        "evaluate_reply_bytes": int(np.mean(by_type[P.MSG_EVALUATE])),
        "one_off_reply_bytes": one_off,
        "round_timings": rounds_out,
        "total_seconds": total,
        "clinic_handler_seconds": grid.traffic.handler_seconds,
        "final_top1": result.rounds[-1].evaluate_metrics.get("top1"),
        "initial_top1": result.rounds[0].evaluate_metrics.get("top1"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bundle", type=Path, default=ROOT / "qana" / "bundles" / "v2",
        help="the bundle whose head and packed size are measured (default: the shipped v2 bundle, as in the README; "
        "tests/fixtures/bundles/tiny-v2 for a quick check)",
    )
    parser.add_argument("--clinics", type=int_list(1), default=[4, 16], help="comma-separated clinic counts (default 4,16)")
    parser.add_argument("--rounds", type=at_least(1), default=2)
    parser.add_argument("--images", type=at_least(1), default=40, help="images per synthetic clinic")
    parser.add_argument("--feature-dims", type=int_list(1), default=[256, 1024], help="also encode heads of these sizes (default 256,1024)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from protocols import messages as P
    from qana.bundle import load_bundle, pack_bundle

    bundle = load_bundle(args.bundle)
    head = bundle.load_head()
    spec = P.HeadSpec.from_head(head, bundle.target)
    whole_model = message_bytes(P.deploy_content(bundle.bundle_id, pack_bundle(bundle)), P.MSG_DEPLOY)
    # The bundle's own head size first, then the other sizes asked for (each once).
    dims = dict.fromkeys([head.num_features] + args.feature_dims)
    sizes = [encoded_sizes(d, head.classes, bundle.target, bundle.bundle_id) for d in dims]

    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_federation(args.bundle, n, args.rounds, args.images, Path(tmp)) for n in args.clinics]

    report = {
        "bundle": str(args.bundle),
        "bundle_id": bundle.bundle_id,
        "target": bundle.target,
        "head_shape": [spec.num_features, spec.num_classes],
        "head_parameters": spec.num_parameters,
        "weight_bits": spec.weight_bits,
        "lower_bound_bytes": spec.lower_bound_bytes,
        "whole_model_message_bytes": whole_model,
        "encodings": sizes,
        "runs": runs,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    lb = spec.lower_bound_bytes
    print(f"bundle {args.bundle.name} ({bundle.bundle_id[:12]}…), target {bundle.target}: head {spec.num_features}x{spec.num_classes} "
          f"= {spec.num_parameters} parameters, {spec.weight_bits}-bit weights -> lower bound {lb:.0f} bytes")
    print()
    print("Upload per clinic per round (measured in a real run, Flower's serialised objects):")
    run0 = runs[0]
    rows = [  # the three train-reply alternatives alike (the evaluate reply is the same for all three)
        ("train reply: int8 head (protocol)", run0["train_reply_bytes"]),
        ("train reply as float32 arrays instead", sizes[0]["float32_message_bytes"]),
        ("train reply as the whole model instead", whole_model),
        ("evaluate reply: metrics only", run0["evaluate_reply_bytes"]),
        ("total per round (int8 head)", run0["train_reply_bytes"] + run0["evaluate_reply_bytes"]),
    ]
    for name, value in rows:
        print(f"  {name:<40} {value:>9,d} B   {value / lb:6.1f} x lower bound")
    print(f"  one-off per clinic: hello reply {run0['one_off_reply_bytes']['query.hello']} B, deploy reply {run0['one_off_reply_bytes']['query.deploy']} B"
          f" (the coordinator sends the {whole_model:,d} B bundle down once)")
    print()
    print("Train-reply size by head size (same encoder; overhead amortises):")
    print(f"  {'features':>8} {'params':>8} {'bound B':>9} {'int8 payload':>12} {'int8 msg B':>10} {'ratio':>6} {'float32 msg B':>13} {'ratio':>6}")
    for s in sizes:
        print(f"  {s['feature_dim']:>8} {s['parameters']:>8} {s['lower_bound_bytes']:>9.0f} {s['int8_payload_bytes']:>12} "
              f"{s['int8_message_bytes']:>10} {s['int8_message_bytes'] / s['lower_bound_bytes']:>6.2f} "
              f"{s['float32_message_bytes']:>13} {s['float32_message_bytes'] / s['lower_bound_bytes']:>6.2f}")
    print()
    print("Coordinator time per round, median over rounds: everything but the clinics' work (message building and")
    print("(de)serialisation, validation, dequantization, Flower's aggregation, signed audit writes); network waits excluded:")
    for run in runs:
        coord = [r["coordinator_seconds"] for r in run["round_timings"]]
        logic = [r["coordinator_logic_seconds"] for r in run["round_timings"]]
        walls = [r["round_seconds"] for r in run["round_timings"]]
        print(f"  {run['clinics']:>3} clinics: {1000 * np.median(coord):7.1f} ms/round, of which {1000 * np.median(logic):6.1f} ms validation+aggregation+audit; "
              f"round wall time with in-process clinics {np.median(walls):.2f} s; federated top1 {run['initial_top1']:.2f} -> {run['final_top1']:.2f}")


if __name__ == "__main__":
    from qana.cli_errors import script_main

    script_main(main)
