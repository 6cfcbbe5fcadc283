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
