"""Every key that crosses the wire, in one place (STYLE.md rule 3).

Record keys name the parts of a Flower ``RecordDict``; config keys travel server ->
node in the ``ConfigRecord``; metric keys travel node -> server in the ``MetricRecord``.
"""

# RecordDict keys (Flower's strategies take these as constructor arguments).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# ConfigRecord keys (server -> node).
SERVER_ROUND = "server-round"  # set by Flower's strategies
LR = "lr"
CLASS_MAP = "class-map"  # fedobj.classmap.ClassMap.to_json()
MODEL_ARGS = "model-args"  # json of fedobj.model.ModelArgs
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
DISTILL_CLASSES = "distill-classes"  # > 0 after growth: distil the first k classes
SECAGG_ARRAY_NAMES = "secagg-array-names"  # json list: names of the legacy arrays
CENTRAL_DP = "central-dp"  # the central-DP mode; its replies weigh 1 each
FEATURE_STATS = "feature-stats"  # true: send per-class feature statistics (CCVR)
EVALUATE_FIRST = "evaluate-first"  # true: score the received model before training
# dp=true: whose ledgers simulated devices spend (the run, or the run it resumes);
# with the edge link, also whose residuals and held models they keep
DP_LEDGER_SCOPE = "dp-ledger-scope"
# the edge link (apps/link.py): how a train reply is compressed, the top-k share,
# whether models come down as int8 deltas, the id of the model a message carries
# and, for a delta, the id of the model it applies to
UPDATE_COMPRESSION = "update-compression"
TOPK_FRACTION = "topk-fraction"
DOWNLINK_COMPRESSION = "downlink-compression"
LINK_MODEL = "link-model"
DOWNLINK_BASE = "downlink-base"

# MetricRecord keys (node -> server).
NUM_EXAMPLES = "num-examples"  # Flower's default weighting key
UNIT_WEIGHT = "unit-weight"  # 1 per reply: central DP averages nodes uniformly
TRAIN_LOSS = "train-loss"
TRAIN_ACCURACY = "train-accuracy"
TRAIN_SECONDS = "train-seconds"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
EVAL_EXAMPLES = "eval-examples"  # a train reply's evaluation (evaluate-first)
LOCAL_ACCURACY = "local-accuracy"  # held-out accuracy of the locally trained model
IGNORED_EXAMPLES = "ignored-examples"
SECAGG_CLIPPED = "secagg-clipped"  # values outside secagg-clipping-range
# DP-SGD (dp=true): what was spent so far and what it is computed from
DP_EPSILON = "dp-epsilon"  # total spent by this device, all rounds and runs
DP_DELTA = "dp-delta"
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
DP_SAMPLE_RATE = "dp-sample-rate"
DP_STEPS = "dp-steps"  # steps this round
DP = "dp"  # ConfigRecord: accountant, device id, what is withheld

# ConfigRecords in a train reply (node -> server): label slug -> image count.
LABEL_HISTOGRAM = "label-histogram"  # images used, per category slug
IGNORED_LABELS = "ignored-labels"  # images skipped: slug not (or not active) in map
# The edge link: a compressed train reply carries DELTA (fedobj.compression.codec)
# instead of ARRAYS; a downlink delta message carries DOWNLINK instead of ARRAYS;
# LINK (ConfigRecord, node -> server) says the codec, the model id the update is
# against, the layout digest and the model id the node now holds.
DELTA = "delta"
DOWNLINK = "downlink"
LINK = "link"
# ArrayRecord in an evaluate reply when asked (FEATURE_STATS): fedobj.calibration's
# per-class count / sum / outer products of the head's input features
FEATURE_STATS_ARRAYS = "feature-stats"

# Node config keys (set per SuperNode with --node-config, or by the simulation).
NODE_DATA_DIR = "data-dir"
NODE_CACHE_DIR = "cache-dir"
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DEVICE_ID = "device-id"  # stable identity: keys the device's DP ledger
