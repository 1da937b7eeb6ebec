"""Model factory, checkpoints, the class map, and the local training loops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedobj.classmap import ClassEntry, ClassMap
from fedobj.data.categories import fashion_mnist_class_map
from fedobj.data.fashion_mnist import ImageArrays, load_fashion_mnist
from fedobj.errors import CheckpointError, ClassMapError, ConfigError
from fedobj.model import (
    Checkpoint,
    ModelArgs,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from fedobj.model.factory import head_keys
from fedobj.train import (
    TrainConfig,
    evaluate,
    lr_for_round,
    map_to_class_map,
    train,
)


@pytest.mark.parametrize(
    "name,size", [("cnn", 28), ("mobilenet_v3_small", 32), ("mobilenet_v3_large", 32)]
)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_factory_builds_every_model(
    name: str, size: int, channels: int, norm: str
) -> None:
    args = ModelArgs(
        name, num_classes=7, in_channels=channels, image_size=size, norm=norm
    )
    model = build_model(args).eval()
    out = model(torch.zeros(2, channels, size, size))
    assert out.shape == (2, 7)
    w, b = head_keys(args)
    assert model.state_dict()[w].shape[0] == 7 and model.state_dict()[b].shape == (7,)
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert has_bn == (norm == "batch")


def test_model_args_refuse_bad_values() -> None:
    with pytest.raises(ConfigError, match="model"):
        ModelArgs("resnet")
    with pytest.raises(ConfigError, match="norm"):
        ModelArgs(norm="layer")
    with pytest.raises(ConfigError, match="image-size"):
        ModelArgs("mobilenet_v3_small", image_size=28)


def test_class_map_contract() -> None:
    cm = ClassMap((ClassEntry(3, "bag", "Bag"), ClassEntry(0, "coat", "Coat", False)))
    assert [e.index for e in cm.entries] == [0, 3]
    assert cm.num_classes == 4  # gaps are kept: row i always means index i
    assert cm.active_indices == [3]
    assert ClassMap.from_json(cm.to_json()) == cm
    assert ClassMap.from_dict(cm.to_dict()) == cm
    with pytest.raises(ClassMapError, match="twice"):
        ClassMap((ClassEntry(0, "a", "A"), ClassEntry(0, "b", "B")))
    with pytest.raises(ClassMapError, match="twice"):
        ClassMap((ClassEntry(0, "a", "A"), ClassEntry(1, "a", "B")))
    with pytest.raises(ClassMapError, match="malformed"):
        ClassMap.from_json("{not json")


def test_checkpoint_round_trip_carries_args_and_class_map(tmp_path: Path) -> None:
    args = ModelArgs("cnn", 10, 1, 28, "group")
    model = build_model(args)
    cm = fashion_mnist_class_map()
    path = save_checkpoint(
        Checkpoint(args, cm, model.state_dict(), round=3, metrics={"acc": 0.5}),
        tmp_path / "c.pt",
    )
    ck = load_checkpoint(path)
    assert ck.model_args == args and ck.class_map == cm and ck.round == 3
    rebuilt = ck.build()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(rebuilt(x), model.eval()(x))
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_refuses_unknown_format_and_garbage(tmp_path: Path) -> None:
    torch.save(
        {"format_version": 99, "model_args": {}, "class_map": [], "state_dict": {}},
        tmp_path / "new.pt",
    )
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "new.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format_version": 1, "state_dict": {}}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="model_args"):
        load_checkpoint(tmp_path / "old.pt")


def test_pretrained_from_own_checkpoint_keeps_matching_weights(tmp_path: Path) -> None:
    src_args = ModelArgs("cnn", 10)
    src = build_model(src_args)
    save_checkpoint(
        Checkpoint(src_args, fashion_mnist_class_map(), src.state_dict()),
        tmp_path / "w.pt",
    )
    torch.manual_seed(123)
    dst = build_model(ModelArgs("cnn", 4), pretrained_path=str(tmp_path / "w.pt"))
    sd_src, sd_dst = src.state_dict(), dst.state_dict()
    torch.testing.assert_close(
        sd_dst["features.0.0.weight"], sd_src["features.0.0.weight"]
    )
    assert sd_dst["classifier.weight"].shape == (4, 128)  # head left fresh


def _fixture_tensors(cm: ClassMap, n: int | None = None):
    data = load_fashion_mnist("train")
    if n:
        data = data.subset(np.arange(n))
    return map_to_class_map(data, cm)


def test_local_training_learns_fashion_mnist() -> None:
    torch.manual_seed(0)
    cm = fashion_mnist_class_map()
    mapped = _fixture_tensors(cm)
    test = map_to_class_map(load_fashion_mnist("test"), cm).tensors
    model = build_model(ModelArgs("cnn", 10))
    before = evaluate(model, test)
    res = train(model, mapped.tensors, TrainConfig(epochs=3, lr=0.02, seed=0))
    after = evaluate(model, test)
    assert res.num_examples == 9000 and res.steps > 0
    assert before.accuracy < 0.2
    assert after.accuracy > 0.6, after.accuracy
    assert after.loss < before.loss
    assert set(after.per_class_accuracy) == set(range(10))


def test_map_to_class_map_ignores_and_counts_unknown_and_inactive() -> None:
    data = ImageArrays(
        np.zeros((6, 1, 28, 28), np.uint8),
        np.array([0, 0, 1, 2, 2, 2]),
        ("bag", "coat", "sandal"),
    )
    cm = ClassMap((ClassEntry(5, "bag", "Bag"), ClassEntry(2, "coat", "Coat", False)))
    mapped = map_to_class_map(data, cm)
    assert mapped.tensors.labels.tolist() == [5, 5]
    assert mapped.ignored == {"coat": 1, "sandal": 3}
    assert mapped.histogram == {"bag": 2}


def test_inactive_classes_are_never_predicted() -> None:
    cm = fashion_mnist_class_map()
    mapped = _fixture_tensors(cm, 300).tensors
    model = build_model(ModelArgs("cnn", 10))
    with torch.no_grad():
        model.classifier.bias.fill_(0.0)
        model.classifier.bias[3] = 100.0  # row 3 would win every prediction
    active = [i for i in range(10) if i != 3]
    assert evaluate(model, mapped).per_class_accuracy.get(3, 0) >= 0.0
    res = evaluate(model, mapped, active=active)
    assert 3 not in res.per_class_accuracy or res.per_class_accuracy[3] == 0.0
    model.eval()
    from fedobj.train import to_input

    logits = model(to_input(mapped.images[:50]))
    assert int(logits.argmax(1).eq(3).sum()) == 50  # unmasked it always says 3


def test_fedprox_term_keeps_weights_closer_to_global() -> None:
    cm = fashion_mnist_class_map()
    data = _fixture_tensors(cm, 600).tensors

    def drift(mu: float) -> float:
        torch.manual_seed(0)
        model = build_model(ModelArgs("cnn", 10))
        start = [p.detach().clone() for p in model.parameters()]
        # lr 0.02: at 0.1 this cnn swings so far on 600 images that the drift
        # is noise (651 without the term, 870 with it, for one seed)
        train(model, data, TrainConfig(lr=0.02, proximal_mu=mu, seed=0))
        return float(
            sum(
                (p.detach() - s).pow(2).sum() for p, s in zip(model.parameters(), start)
            )
        )

    assert drift(1.0) < drift(0.0)


def test_lr_schedule_is_cosine_to_lr_min() -> None:
    assert lr_for_round(0.1, 1, 10, lr_min=0.01) == pytest.approx(0.1)
    assert lr_for_round(0.1, 10, 10, lr_min=0.01) == pytest.approx(0.01)
    assert lr_for_round(0.1, 15, 10, lr_min=0.01) == pytest.approx(0.01)
    assert lr_for_round(0.1, 6, 11) == pytest.approx(0.05)  # halfway


def test_lr_schedule_horizon_can_differ_from_the_run_length() -> None:
    from fedobj.config import RunConfig

    base = {"num-server-rounds": 30, "lr": 0.1, "lr-min": 0.01}
    cfg = RunConfig.from_flower({**base, "lr-schedule-rounds": 20})
    assert cfg.lr_at(20) == pytest.approx(0.01) and cfg.lr_at(30) == pytest.approx(0.01)
    assert RunConfig.from_flower(base).lr_at(20) > 0.01


def test_distillation_keeps_old_class_outputs_near_the_teacher() -> None:
    """After growth, LwF pulls the old classes' outputs towards the received model:
    on held-out images they drift less from the teacher than without it."""
    import copy

    from fedobj.train import distillation_loss, to_input

    cm = fashion_mnist_class_map()
    data = map_to_class_map(load_fashion_mnist("train"), cm).tensors
    torch.manual_seed(0)
    teacher = build_model(ModelArgs("cnn", 10))
    train(teacher, data, TrainConfig(lr=0.02, seed=0))
    teacher.eval()
    probe = to_input(map_to_class_map(load_fashion_mnist("test"), cm).tensors.images)
    old = torch.arange(6)

    def drift(weight: float) -> float:
        student = copy.deepcopy(teacher)
        cfg = TrainConfig(lr=0.02, seed=1, distill_classes=6, distill_weight=weight)
        train(student, data, cfg, teacher=copy.deepcopy(teacher))
        student.eval()
        with torch.no_grad():
            return float(distillation_loss(student(probe), teacher(probe), old, 1.0))

    without, with_ = drift(0.0), drift(2.0)
    assert with_ < 0.7 * without, (with_, without)


def test_distillation_ignores_masked_rows() -> None:
    """An inactive old class is -inf after masking; the KD term uses raw logits of
    active old classes only, so training stays finite."""
    import copy

    cm = ClassMap(
        tuple(
            ClassEntry(e.index, e.slug, e.name, e.index != 2)
            for e in fashion_mnist_class_map().entries
        )
    )
    data = map_to_class_map(load_fashion_mnist("train").subset(np.arange(200)), cm)
    assert 2 not in data.tensors.labels.tolist()  # inactive: never trained on
    model = build_model(ModelArgs("cnn", 10))
    active = cm.active_indices
    cfg = TrainConfig(lr=0.02, distill_classes=6, distill_weight=1.0)
    res = train(model, data.tensors, cfg, active=active, teacher=copy.deepcopy(model))
    assert np.isfinite(res.loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_one_seed_trains_to_the_same_bits_dropout_included() -> None:
    """The cnn has dropout, drawn from the global RNG: the seed must decide it,
    whatever that RNG held before, and the caller's stream must be left alone."""
    data = _fixture_tensors(fashion_mnist_class_map(), 300).tensors

    def trained(seed: int, noise: int) -> list[bytes]:
        torch.manual_seed(0)
        model = build_model(ModelArgs("cnn", 10))
        torch.manual_seed(noise)  # whatever the process drew before
        train(model, data, TrainConfig(lr=0.05, seed=seed))
        return [v.numpy().tobytes() for v in model.state_dict().values()]

    assert trained(5, noise=1) == trained(5, noise=2)
    assert trained(5, noise=1) != trained(6, noise=1)
    model = build_model(ModelArgs("cnn", 10))
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    train(model, data, TrainConfig(lr=0.05, seed=5))
    assert torch.equal(torch.rand(4), expected)
