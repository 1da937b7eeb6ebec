"""The run config's sections besides privacy and secure aggregation.

Each is a frozen dataclass of the keys one concern reads: the rounds and local
training, the model, class growth, evaluation, simulated data, and where a run
keeps its outputs, catalog and versions. Defaults here are the defaults: the
table in ``pyproject.toml`` repeats them because Flower accepts only declared
keys, and a test holds the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedobj.config.options import Need, Section, option
from fedobj.data.partition import PARTITIONERS
from fedobj.model.factory import MODEL_NAMES, NORMS

STRATEGIES = ("fedavg", "fedprox", "fedadam", "perffedavg")
HEAD_CALIBRATIONS = ("none", "virtual-features")
"""``virtual-features``: CCVR on the server each round (fedobj.calibration)."""
CLASS_SPLITS = ("none", "disjoint")
PROMOTE = ("latest", "best")

ABSOLUTE = 'absolute path or ""'


def one_of(values: tuple[str, ...]) -> str:
    """Allowed values as the reference prints them."""
    return " | ".join(values)


def need_absolute(need: Need, key: str, value: str) -> None:
    """Paths are read by processes the SuperLink starts, in its working folder."""
    need(
        not value or Path(value).is_absolute(),
        key,
        "must be an absolute path (nodes and the ServerApp run elsewhere)",
    )


@dataclass(frozen=True)
class TrainingConfig(Section):
    """The rounds, the strategy and what each node's local training does."""

    NAME = "training"
    TITLE = "Rounds and local training"

    num_server_rounds: int = option(
        5,
        "rounds this run trains (resumed: rounds added, or the interrupted run's rest)",
        ">= 1",
    )
    strategy: str = option(
        "fedavg",
        "aggregation: FedAvg, FedProx, server-side Adam, or PerfFedAvg (weights mix "
        "data size and local accuracy)",
        one_of(STRATEGIES),
    )
    fraction_train: float = option(
        1.0, "share of the connected nodes sampled to train each round", "(0, 1]"
    )
    min_nodes: int = option(
        2, "nodes the run waits for before round 1, and the fewest it samples", ">= 1"
    )
    round_timeout: float = option(
        600.0, "seconds to wait for a round's replies; a silent node is dropped", "> 0"
    )
    seed: int = option(
        42, "seeds the model, partitions and each node's training (one seed, one model)"
    )
    local_epochs: int = option(1, "epochs each node trains per round", ">= 1")
    batch_size: int = option(32, "local mini-batch size", ">= 2")
    lr: float = option(
        0.03, "learning rate where the cosine schedule across rounds starts", "> 0"
    )
    lr_min: float = option(
        0.005, "learning rate the cosine schedule ends at", "[0, lr]"
    )
    lr_schedule_rounds: int = option(
        0,
        "rounds the schedule spans (then lr-min); 0 = num-server-rounds",
        ">= 0",
    )
    momentum: float = option(0.9, "SGD momentum on the nodes", "[0, 1)")
    weight_decay: float = option(0.0005, "SGD weight decay on the nodes", ">= 0")
    proximal_mu: float = option(0.01, "FedProx: weight of the proximal term", ">= 0")
    server_lr: float = option(0.01, "FedAdam: the server optimizer's step size", "> 0")
    perf_alpha: float = option(
        0.5, "PerfFedAvg: weight of data size against local accuracy", "[0, 1]"
    )
    client_threads: int = option(
        1, "torch threads per ClientApp (the CPUs Flower gives each node)", ">= 1"
    )

    def check(self, need: Need) -> None:
        need(self.num_server_rounds >= 1, "num-server-rounds", "must be >= 1")
        need(self.strategy in STRATEGIES, "strategy", f"must be one of {STRATEGIES}")
        need(0 < self.fraction_train <= 1, "fraction-train", "must be in (0, 1]")
        need(self.min_nodes >= 1, "min-nodes", "must be >= 1")
        need(self.round_timeout > 0, "round-timeout", "must be > 0")
        need(self.local_epochs >= 1, "local-epochs", "must be >= 1")
        need(self.batch_size >= 2, "batch-size", "must be >= 2")
        need(self.lr > 0, "lr", "must be > 0")
        need(0 <= self.lr_min <= self.lr, "lr-min", "must be in [0, lr]")
        need(self.lr_schedule_rounds >= 0, "lr-schedule-rounds", "must be >= 0")
        need(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        need(self.weight_decay >= 0, "weight-decay", "must be >= 0")
        need(self.proximal_mu >= 0, "proximal-mu", "must be >= 0")
        need(self.server_lr > 0, "server-lr", "must be > 0")
        need(0 <= self.perf_alpha <= 1, "perf-alpha", "must be in [0, 1]")
        need(self.client_threads >= 1, "client-threads", "must be >= 1")


@dataclass(frozen=True)
class ModelConfig(Section):
    """The network a new run builds (a resumed run keeps its checkpoint's)."""

    NAME = "model"
    TITLE = "Model"

    model: str = option("cnn", "the network", one_of(MODEL_NAMES))
    norm: str = option(
        "group",
        "normalisation: GroupNorm (robust to label skew, DP-compatible) or BatchNorm",
        one_of(NORMS),
    )
    image_size: int = option(28, "input side in pixels (images are resized)", ">= 16")
    in_channels: int = option(1, "1 (greyscale) or 3 (colour)", "1 | 3")
    pretrained_path: str = option(
        "", "a checkpoint of this project's to start from", ABSOLUTE
    )

    def check(self, need: Need) -> None:
        need(self.model in MODEL_NAMES, "model", f"must be one of {MODEL_NAMES}")
        need(self.norm in NORMS, "norm", f"must be one of {NORMS}")
        need(self.in_channels in (1, 3), "in-channels", "must be 1 or 3")
        need(self.image_size >= 16, "image-size", "must be >= 16")
        need_absolute(need, "pretrained-path", self.pretrained_path)


@dataclass(frozen=True)
class GrowthConfig(Section):
    """What happens when the catalog gains categories mid-federation."""

    NAME = "growth"
    TITLE = "Class growth"

    initial_categories: int = option(
        10, "Fashion-MNIST categories seeded into an empty catalog (0: none)", "0..10"
    )
    distill_weight: float = option(
        1.0, "LwF: weight of distilling the old classes after a growth (0: off)", ">= 0"
    )
    distill_rounds: int = option(
        5, "rounds from a growth in which nodes distil (the shared recipe: 1)", ">= 0"
    )
    head_calibration: str = option(
        "none",
        "virtual-features: the server refits the head each round on the nodes' "
        "per-class feature statistics (CCVR); not with dp, central-dp or secagg",
        one_of(HEAD_CALIBRATIONS),
    )

    def check(self, need: Need) -> None:
        need(
            0 <= self.initial_categories <= 10,
            "initial-categories",
            "must be in 0..10 (Fashion-MNIST names seeded into an empty catalog)",
        )
        need(self.distill_weight >= 0, "distill-weight", "must be >= 0")
        need(self.distill_rounds >= 0, "distill-rounds", "must be >= 0")
        need(
            self.head_calibration in HEAD_CALIBRATIONS,
            "head-calibration",
            f"must be one of {HEAD_CALIBRATIONS}",
        )


@dataclass(frozen=True)
class EvaluationConfig(Section):
    """Federated evaluation on the nodes, and the server's own every round."""

    NAME = "evaluation"
    TITLE = "Evaluation"

    fraction_evaluate: float = option(
        0.5, "share of the connected nodes sampled to evaluate each round", "(0, 1]"
    )
    evaluate_on_arrival: bool = option(
        False,
        "nodes score the model they receive before training, in the train "
        "message: one message a round, not two (a SuperNode starts a process for "
        "each); a round's federated figures are then its starting model's",
    )
    eval_fraction: float = option(
        0.1, "share of each node's images held out for its evaluation", "[0, 1)"
    )
    central_eval: bool = option(
        True, "the server scores every round's model: accuracy, per class, confusion"
    )
    central_eval_dir: str = option(
        "",
        "the server's image folder `DIR/<category-slug>/*.png|jpg` to score on; "
        '"": Fashion-MNIST\'s test split',
        ABSOLUTE,
    )

    def check(self, need: Need) -> None:
        need(0 < self.fraction_evaluate <= 1, "fraction-evaluate", "must be in (0, 1]")
        need(0 <= self.eval_fraction < 1, "eval-fraction", "must be in [0, 1)")
        need_absolute(need, "central-eval-dir", self.central_eval_dir)


@dataclass(frozen=True)
class SimulationConfig(Section):
    """Simulated nodes: where Fashion-MNIST is, how it is split among them, and
    how a round's messages reach Ray's workers."""

    NAME = "simulation"
    TITLE = "Simulation"

    dataset_dir: str = option(
        "",
        'Fashion-MNIST folder; "": `$FEDOBJ_FASHION_MNIST_DIR`, else the Debian '
        "package",
        ABSOLUTE,
    )
    partitioner: str = option(
        "dirichlet", "how simulated nodes split the images", one_of(PARTITIONERS)
    )
    dirichlet_alpha: float = option(
        0.5, "dirichlet: label skew (smaller: more skewed)", "> 0"
    )
    classes_per_node: int = option(2, "k-classes: categories per node", ">= 1")
    class_split: str = option(
        "none",
        "disjoint: nodes hold only old (< split-first-new) or only new categories",
        one_of(CLASS_SPLITS),
    )
    new_node_fraction: float = option(
        0.3, "disjoint: share of nodes holding only new categories", "(0, 1)"
    )
    split_first_new: int = option(
        0, "disjoint: first new class (0 = initial-categories; joint baselines)", "0..9"
    )
    dispatch_stagger: float = option(
        0.0,
        "Ray: push train messages longest node first, this many s apart (0.12 fits "
        "Flower's dispatcher; 0: all at once)",
        "[0, 1]",
    )

    def check(self, need: Need) -> None:
        need_absolute(need, "dataset-dir", self.dataset_dir)
        need(
            self.partitioner in PARTITIONERS,
            "partitioner",
            f"must be one of {PARTITIONERS}",
        )
        need(self.dirichlet_alpha > 0, "dirichlet-alpha", "must be > 0")
        need(self.classes_per_node >= 1, "classes-per-node", "must be >= 1")
        need(
            self.class_split in CLASS_SPLITS,
            "class-split",
            "must be none or disjoint",
        )
        need(0 < self.new_node_fraction < 1, "new-node-fraction", "must be in (0, 1)")
        need(
            0 <= self.split_first_new <= 9,
            "split-first-new",
            "must be 0 (= initial-categories) or a class from 1 to 9",
        )
        need(
            0 <= self.dispatch_stagger <= 1,
            "dispatch-stagger",
            "must be between 0 (off) and 1 second",
        )


@dataclass(frozen=True)
class DeploymentConfig(Section):
    """Where a run keeps its outputs, catalog and versions, and how it shares
    them with other runs (lease, resume, which version is current)."""

    NAME = "deployment"
    TITLE = "Outputs, catalog and versions"

    outputs_dir: str = option(
        "",
        'outputs root; "": `$FEDOBJ_OUTPUTS_DIR`, else `<SuperLink cwd>/outputs`',
        ABSOLUTE,
    )
    database_url: str = option(
        "",
        'catalog; "": `$FEDOBJ_DATABASE_URL`, else `<outputs>/catalog.db`; '
        "`postgresql://…`",
    )
    registry_uri: str = option(
        "",
        'artifact store; "": `$FEDOBJ_REGISTRY_URI`, else the outputs folder; '
        "any pyarrow.fs URI (`s3://…`)",
    )
    promote: str = option(
        "latest",
        "which version becomes current: the newest, or the most accurate with the "
        "same class map",
        one_of(PROMOTE),
    )
    resume: bool = option(
        False, "start from the current version (weights, class map, optimizer state)"
    )
    allow_concurrent_runs: bool = option(
        False, "take the catalog's run lease even if a live run holds it"
    )
    lease_ttl: float = option(
        1800.0, "seconds the run lease lasts unrenewed (renewed every round)", "> 0"
    )

    def check(self, need: Need) -> None:
        need_absolute(need, "outputs-dir", self.outputs_dir)
        need(self.promote in PROMOTE, "promote", "must be latest or best")
        need(self.lease_ttl > 0, "lease-ttl", "must be > 0")
