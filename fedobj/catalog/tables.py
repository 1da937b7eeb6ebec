"""Piccolo tables of the category catalog and of run/version bookkeeping.

These classes are the schema's source of truth for ``piccolo migrations new catalog
--auto``. They are never queried directly: :class:`fedobj.catalog.Catalog` binds a
subclass of each to its own engine (see :func:`fedobj.catalog.db.bind_tables`), so
a SQLite catalog and a PostgreSQL catalog can live in one process, which a module
level ``DB`` in ``piccolo_conf.py`` cannot give.

Rules the database enforces itself rather than trusting code (DESIGN.md 1, 6, 8):
unique ``slug``, unique case-folded name (``name_key``), unique ``class_index``,
unique version ``name`` and, through indexes created in the second migration,
unique ``(run_id, round)`` and at most one ``is_current`` version.
"""

from __future__ import annotations

from piccolo.columns import (
    JSON,
    UUID,
    BigInt,
    Boolean,
    DoublePrecision,
    ForeignKey,
    Integer,
    OnDelete,
    Text,
    Timestamptz,
    Varchar,
)
from piccolo.table import Table

NAME_MAX = 255
"""Longest display name, slug, version name, run id or node id we store."""


class Category(Table, tablename="category"):
    """A category devices can label images with; its row in every model's head.

    ``class_index`` is taken from :class:`Counter` (``"class_index"``) so that it
    is never reused, even after a hard delete removed the highest one.
    ``name_key`` is the trimmed, case-folded name: a unique column is the one
    case-insensitive uniqueness rule SQLite and PostgreSQL enforce alike.
    """

    id = UUID(primary_key=True)
    name = Varchar(length=NAME_MAX)
    name_key = Varchar(length=NAME_MAX, unique=True)
    slug = Varchar(length=NAME_MAX, unique=True)
    description = Text(default="")
    class_index = Integer(unique=True)
    is_active = Boolean(default=True)
    sample_count = BigInt(default=0)
    created_at = Timestamptz()
    updated_at = Timestamptz()


class Counter(Table, tablename="catalog_counter"):
    """Monotonic counters that must survive deletes (``class_index``, ``version``).

    ``value`` is how many numbers were ever handed out, i.e. the next one.
    """

    name = Varchar(length=64, primary_key=True)
    value = BigInt(default=0)


class ModelVersion(Table, tablename="model_version"):
    """One trained model: what it can classify, how well, and where it lives.

    ``class_map_key`` (sha256 of the class map's JSON) makes "best among versions
    with the same class map" one indexed query; ``accuracy`` is copied out of
    ``metrics`` for the same reason. ``number`` orders versions and names them
    ``v0007`` when the caller gives no name.
    """

    id = UUID(primary_key=True)
    number = Integer(unique=True)
    name = Varchar(length=NAME_MAX, unique=True)
    parent: ForeignKey[ModelVersion] = ForeignKey(
        "self", null=True, on_delete=OnDelete.restrict
    )
    run_id = Varchar(length=NAME_MAX, index=True)
    round = Integer(default=0)
    class_map = JSON()
    class_map_key = Varchar(length=64, index=True)
    num_classes = Integer(default=0)
    metrics = JSON()
    accuracy = DoublePrecision(null=True, default=None)
    checkpoint_uri = Text()
    checkpoint_sha256 = Varchar(length=64)
    onnx_uri = Text(null=True, default=None)
    size_bytes = BigInt(default=0)
    provenance = JSON()
    server_state_uri = Text(null=True, default=None)
    artifacts = JSON(default={})
    is_current = Boolean(default=False)
    pruned = Boolean(default=False)
    notes = Text(default="")
    created_at = Timestamptz()


class TrainingRound(Table, tablename="training_round"):
    """One server round of one run, as the strategy saw it.

    ``(run_id, round)`` is unique through an index made in the second migration:
    Piccolo emits a table-level ``Unique`` as ``ALTER TABLE ... ADD CONSTRAINT``,
    which SQLite does not support.
    """

    run_id = Varchar(length=NAME_MAX)
    round = Integer()
    status = Varchar(length=16, default="pending")
    nodes_sampled = Integer(default=0)
    nodes_replied = Integer(default=0)
    nodes_rejected = Integer(default=0)
    started_at = Timestamptz(null=True, default=None)
    completed_at = Timestamptz(null=True, default=None)
    central_accuracy = DoublePrecision(null=True, default=None)
    central_loss = DoublePrecision(null=True, default=None)


class Node(Table, tablename="node"):
    """A device (SuperNode) as it last reported itself."""

    node_id = Varchar(length=NAME_MAX, unique=True)
    last_seen = Timestamptz()
    samples = BigInt(default=0)
    label_names = JSON()
    status = Varchar(length=32, default="active")
    dp_epsilon = DoublePrecision(null=True, default=None)  # DP budget spent (dp=true)


class NodeRound(Table, tablename="node_round"):
    """What one node reported for one train or evaluate message.

    Keyed by ``node_id`` text, not a foreign key, so metrics of a round survive a
    node row being re-created; :meth:`Catalog.forget_node` deletes both.
    """

    run_id = Varchar(length=NAME_MAX, index=True)
    round = Integer()
    node_id = Varchar(length=NAME_MAX, index=True)
    kind = Varchar(length=16)
    num_examples = BigInt(default=0)
    loss = DoublePrecision(null=True, default=None)
    accuracy = DoublePrecision(null=True, default=None)
    error = Text(null=True, default=None)
    created_at = Timestamptz()
    train_seconds = DoublePrecision(null=True, default=None)  # the node's own timing
    dp_epsilon = DoublePrecision(null=True, default=None)  # budget spent so far (dp)


class Run(Table, tablename="run"):
    """One ``flwr run`` as the ServerApp started it, and how it ended.

    The rounds table says how far a run got; this row says what it was asked to do
    (strategy, model, rounds ``first_round..last_round``) and its end (``running``,
    ``completed`` or ``failed`` with the error), so the console can show "round k
    of N" before the first version exists and a failed run reads as failed.
    """

    run_id = Varchar(length=NAME_MAX, unique=True)
    status = Varchar(length=16, default="running")
    strategy = Varchar(length=64, default="")
    model = Varchar(length=64, default="")
    first_round = Integer(default=1)
    last_round = Integer(default=0)
    config = JSON(default={})
    error = Text(null=True, default=None)
    started_at = Timestamptz()
    finished_at = Timestamptz(null=True, default=None)


class RunLease(Table, tablename="run_lease"):
    """Who is training against this catalog, and until when.

    A single row per ``name`` (``"training"``); acquiring is one conditional
    ``UPDATE``, so two runs racing for it cannot both win on either database.
    """

    name = Varchar(length=64, primary_key=True)
    holder = Varchar(length=NAME_MAX, null=True, default=None)
    acquired_at = Timestamptz(null=True, default=None)
    expires_at = Timestamptz(null=True, default=None)


class ApiKey(Table, tablename="api_key"):
    """An admin-API key: only its keyed hash is stored (``fedobj.apikeys``).

    ``key_id`` is the public part of the token (``fo_<key_id>_<secret>``): the
    lookup is one indexed equality, then one constant-time hash comparison.
    """

    id = UUID(primary_key=True)
    key_id = Varchar(length=32, unique=True)
    key_hash = Varchar(length=64)
    role = Varchar(length=16)
    name = Varchar(length=NAME_MAX, default="")
    created_at = Timestamptz()
    revoked_at = Timestamptz(null=True, default=None)
    last_used_at = Timestamptz(null=True, default=None)


class AuditEntry(Table, tablename="audit_entry"):
    """One admin write: who (key id, or ``cli:<user>``), what, on what, when."""

    at = Timestamptz(index=True)
    actor = Varchar(length=64)
    action = Varchar(length=64)
    target = Varchar(length=NAME_MAX, default="")
    detail = JSON(default={})


class Detection(Table, tablename="detection"):
    """One answered detection: the image's hash, never the image."""

    at = Timestamptz(index=True)
    actor = Varchar(length=64)
    image_sha256 = Varchar(length=64)
    model_version = Varchar(length=NAME_MAX)
    detected = Boolean(default=False)
    top_class_index = Integer(null=True, default=None)
    top_confidence = DoublePrecision(null=True, default=None)
    predictions = JSON(default=[])
    inference_time_ms = DoublePrecision(default=0.0)


ALL_TABLES: tuple[type[Table], ...] = (
    Category,
    Counter,
    ModelVersion,
    TrainingRound,
    Node,
    NodeRound,
    Run,
    RunLease,
    ApiKey,
    AuditEntry,
    Detection,
)
