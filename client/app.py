"""The QANA-FL ClientApp: Flower's Message API on the clinic side.

Flower's SuperNode starts this app in a fresh process for every message (deployment engine)
or calls it in-process (simulation engine); either way all state lives on disk in the
clinic's cache (bundles, features), and everything the clinic needs comes from
`context.node_config`. Each handler validates the instruction against `protocols.messages`,
does the work in `client.clinic.Clinic`, and replies with exactly the records the protocol
allows. An exception becomes Flower's error reply, whose reason the coordinator logs.
"""

from __future__ import annotations

from logging import INFO
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import log

from client.clinic import Clinic, ClinicConfig, head_spec
from protocols.messages import (
    deploy_reply_content,
    evaluate_reply_content,
    hello_reply_content,
    peek_bundle_id,
    train_reply_content,
    validate_deploy_ins,
    validate_evaluate_ins,
    validate_hello_ins,
    validate_train_ins,
)

app = ClientApp()


def clinic_from_context(context: Context) -> Clinic:
    """The clinic this process serves, from the SuperNode's node config."""
    return Clinic(ClinicConfig.from_node_config(context.node_config))


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Tell the coordinator who we are and which bundles we already hold."""
    validate_hello_ins(msg.content)
    clinic = clinic_from_context(context)
    info = clinic.hello()
    log(INFO, "[%s] hello: %d cached bundle(s); %s", info.clinic_id, len(info.cached_bundles), info.device)
    return Message(hello_reply_content(info), reply_to=msg)


@app.query("deploy")
def deploy(msg: Message, context: Context) -> Message:
    """Install the announced bundle (verified against its id) and precompute features."""
    bundle_id, packed = validate_deploy_ins(msg.content)
    clinic = clinic_from_context(context)
    info = clinic.deploy(bundle_id, packed)
    log(INFO, "[%s] installed bundle %s… (%d bytes); %s", info.clinic_id, bundle_id[:12], len(packed), info.device)
    return Message(deploy_reply_content(info), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: train the head locally, put it on the chip, send the quantized head."""
    clinic = clinic_from_context(context)
    bundle = clinic.bundles.get(peek_bundle_id(msg.content))
    head, settings = validate_train_ins(msg.content, head_spec(bundle))
    qhead, metrics = clinic.train(head, settings)
    log(INFO, "[%s] round %d: trained head on %d images", clinic.config.clinic_id, settings.server_round, metrics["num-examples"])
    return Message(train_reply_content(qhead, metrics, clinic.info(settings.bundle_id)), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Put the global head on the chip and evaluate it on the held-out images."""
    clinic = clinic_from_context(context)
    bundle = clinic.bundles.get(peek_bundle_id(msg.content))
    head, settings = validate_evaluate_ins(msg.content, head_spec(bundle))
    metrics = clinic.evaluate(head, settings)
    log(INFO, "[%s] round %d: %s top1=%.3f", clinic.config.clinic_id, settings.server_round, settings.head_id, metrics["top1"])
    return Message(evaluate_reply_content(metrics, clinic.info(settings.bundle_id, settings.head_id)), reply_to=msg)


# --------------------------------------------------------------------------- akida-edge learning
# The `--learning akida-edge` mode's messages (protocols.edge_messages); the work is in
# client.edge_learning.EdgeClinic. Imported inside the handlers so this block stays apart
# from the gradient handlers above (and a gradient-only clinic never loads it).


if TYPE_CHECKING:
    from client.edge_learning import EdgeClinic


def _edge_clinic(context: Context) -> EdgeClinic:
    from client.edge_learning import EdgeClinic

    return EdgeClinic(clinic_from_context(context))


@app.query("edge_params")
def edge_params(msg: Message, context: Context) -> Message:
    """Choose this clinic's own edge-learning settings on its training part; send only the three numbers."""
    from protocols.edge_messages import (
        edge_params_reply_content,
        validate_edge_params_ins,
    )

    bundle_id, seed = validate_edge_params_ins(msg.content)
    edge = _edge_clinic(context)
    params, n = edge.choose_params(bundle_id, seed)
    log(INFO, "[%s] edge settings: %d weights, %d neurons/class, competition %.2f", edge.clinic.config.clinic_id,
        params.num_weights, params.neurons_per_class, params.learning_competition)
    content = edge_params_reply_content(
        n, params.num_weights, params.neurons_per_class, params.learning_competition, params.median_active, edge.clinic.info(bundle_id)
    )
    return Message(content, reply_to=msg)


@app.train("edge")
def train_edge(msg: Message, context: Context) -> Message:
    """One akida-edge round: continue Akida learning from the global neurons; send the learned neurons."""
    from protocols.edge_messages import (
        train_edge_reply_content,
        validate_train_edge_ins,
    )

    edge = _edge_clinic(context)
    bundle = edge.clinic.bundles.get(peek_bundle_id(msg.content))
    head, settings = validate_train_edge_ins(msg.content, bundle.feature_dim)
    learned, metrics = edge.train(head, settings)
    log(INFO, "[%s] round %d: edge learning on %d images", edge.clinic.config.clinic_id, settings.server_round, metrics["num-examples"])
    return Message(train_edge_reply_content(learned, metrics, edge.clinic.info(settings.bundle_id)), reply_to=msg)


@app.evaluate("edge")
def evaluate_edge(msg: Message, context: Context) -> Message:
    """Evaluate the global edge head with Akida on the held-out images."""
    from protocols.edge_messages import validate_evaluate_edge_ins

    edge = _edge_clinic(context)
    bundle = edge.clinic.bundles.get(peek_bundle_id(msg.content))
    head, settings = validate_evaluate_edge_ins(msg.content, bundle.feature_dim)
    metrics = edge.evaluate(head, settings)
    log(INFO, "[%s] round %d: edge head %s top1=%.3f", edge.clinic.config.clinic_id, settings.server_round, settings.head_id[:12], metrics["top1"])
    return Message(evaluate_reply_content(metrics, edge.clinic.info(settings.bundle_id, settings.head_id)), reply_to=msg)
